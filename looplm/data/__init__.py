"""Data: corpora (stdlib, files, JSON Lines, Parquet, hub), tokenizers, token files, batches.

``prepare_corpus(source, tokenizer, cache_dir) -> Corpus`` is the entry point the trainer
uses; ``BatchSampler`` draws resumable, rank-sharded batches from ``corpus.train``.
"""

from looplm.data.corpus import Corpus, CorpusStats, cache_root, prepare_corpus
from looplm.data.loader import BatchSampler, eval_batches
from looplm.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer
from looplm.data.tokens import TokenFile, TokenWriter

__all__ = [
    "BPETokenizer", "BatchSampler", "ByteTokenizer", "Corpus", "CorpusStats", "TokenFile", "TokenWriter",
    "Tokenizer", "cache_root", "eval_batches", "load_tokenizer", "prepare_corpus",
]
