"""Tokenizer and chat template through transformers, offline, with a converted-tokenizer cache.

Building a tokenizer from GGUF metadata takes seconds; the converted one is saved
once under the cache folder and reloads in a fraction of that.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument
from services.worker.request import ChatTurn

logger = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int] = ()) -> None:
        self._tok = hf_tokenizer
        eos = list(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.append(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids = tuple(dict.fromkeys(eos))

    @classmethod
    def load(cls, model_path: Path, cache_dir: Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        from transformers import AutoTokenizer

        if model_path.is_dir():
            return cls(AutoTokenizer.from_pretrained(str(model_path), local_files_only=True), eos_token_ids)
        stat = model_path.stat()
        key = re.sub(r"[^A-Za-z0-9._-]", "_", f"{model_path.stem}-{stat.st_size}-{int(stat.st_mtime)}")
        cached = cache_dir / "tokenizers" / key
        if (cached / "tokenizer_config.json").exists():
            return cls(AutoTokenizer.from_pretrained(str(cached), local_files_only=True), eos_token_ids)
        logger.info("converting tokenizer from GGUF metadata", extra={"source": model_path.name})
        tok = AutoTokenizer.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, local_files_only=True
        )
        try:
            tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
            tok.save_pretrained(str(tmp))
            tmp.replace(cached)
        except OSError as exc:
            # A read-only cache only costs start-up time.
            logger.warning("could not cache tokenizer: %s", exc)
        return cls(tok, eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        """A raw prompt, with the special tokens (e.g. BOS) the model expects at the start."""
        return list(self._tok.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: Sequence[ChatTurn]) -> list[int]:
        """Messages through the model's chat template, ready for the assistant's turn."""
        if not self._tok.chat_template:
            raise InvalidArgument("messages", "this model has no chat template; send a prompt instead")
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        # The template places BOS and the other special tokens itself.
        text = self._tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))
