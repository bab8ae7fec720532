"""Tokenizers of the models exo-stable serves: exact llama.cpp tokenization, chat templates, stop tokens.

Owns: text to token ids and back for byte-level BPE (:mod:`.bytelevel`), SentencePiece (:mod:`.spm`) and
raw-UTF-8 BPE (:mod:`.rawbpe`) vocabularies read from GGUF metadata (:mod:`.gguf_vocab`) or from a Hugging
Face ``tokenizer.json`` (:mod:`.hfjson`); special-token rules and the :class:`Tokenizer` API (:mod:`.core`);
chat template rendering (:mod:`.chat`).
"""

from exo_stable.tokenizer._meta import TokenizerError
from exo_stable.tokenizer.bytelevel import byte_level_decode_map
from exo_stable.tokenizer.chat import CHAT_ROLES, ChatMessage
from exo_stable.tokenizer.core import Tokenizer

__all__ = ["CHAT_ROLES", "ChatMessage", "Tokenizer", "TokenizerError", "byte_level_decode_map"]
