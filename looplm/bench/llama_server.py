"""``python -m looplm.bench.llama_server [--no-extra-bufts] ARGS``: llama-cpp-python's
OpenAI-compatible server (``python -m llama_cpp.server ARGS``), with llama.cpp's extra CPU buffer
types off under ``--no-extra-bufts`` (:func:`looplm.bench.pretrained.llama_extra_bufts`: they
crash in some virtual machines whose CPUs report AMX). ``looplm bench serve`` starts it.
"""

from __future__ import annotations

import sys

from looplm.bench.pretrained import llama_extra_bufts


def main(argv: list[str]) -> None:
    """Run the server with ``argv`` (its own arguments, plus ``--no-extra-bufts``) until stopped."""
    import llama_cpp.server.__main__ as server

    sys.argv = ["llama_cpp.server", *(a for a in argv if a != "--no-extra-bufts")]
    with llama_extra_bufts("--no-extra-bufts" not in argv):
        server.main()


if __name__ == "__main__":
    main(sys.argv[1:])
