"""Runs the exported content encoder (content_encoder.onnx + tokenizer.json) without torch.

The service uses this to turn a newly ingested item's text into the same 384-d vector that
`offline/content.py` computed with sentence-transformers for the catalog (parity is tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from sidrec.bundle import Bundle

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class ContentEncoder:
    """texts -> float32[B, D] L2-normalised embeddings via onnxruntime + tokenizers.

    `quantized`: the graph is the int8 one (manifest content.precision). Its activations are
    quantised by each run's own range, so a text's vector depends on what shares its run:
    it encodes one text per run on the CPU provider, exactly as the offline pipeline encoded
    the catalog (offline/content.py).
    """

    def __init__(
        self,
        onnx_path: str | Path,
        tokenizer_path: str | Path,
        providers: Sequence[str] | None = None,
        batch_size: int = 64,
        session_options: ort.SessionOptions | None = None,
        quantized: bool = False,
    ) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        if self.tokenizer.truncation is None or self.tokenizer.padding is None:
            # Without both, a long text overflows the model and a batch cannot be stacked.
            raise ValueError(f"{tokenizer_path}: tokenizer must have truncation and padding")
        if quantized:
            providers, batch_size = ["CPUExecutionProvider"], 1
        elif providers is None:
            # GPU when this onnxruntime build and a GPU are there, else CPU. Not simply
            # get_available_providers(): some builds list e.g. AzureExecutionProvider first.
            available = ort.get_available_providers()
            providers = [p for p in DEFAULT_PROVIDERS if p in available]
        self.session = ort.InferenceSession(
            str(onnx_path), session_options, providers=list(providers)
        )
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.max_tokens = int(self.tokenizer.truncation["max_length"])
        self.batch_size = batch_size

    @classmethod
    def of_bundle(
        cls,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        session_options: ort.SessionOptions | None = None,
    ) -> ContentEncoder:
        """The bundle's content encoder, at the precision its manifest records."""
        return cls(
            bundle.file("content_encoder.onnx"),
            bundle.file("tokenizer.json"),
            providers,
            session_options=session_options,
            quantized=bundle.content_quantized,
        )

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts[B] -> float32[B, D]; runs in chunks of batch_size to bound memory."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer.encode_batch(texts[start : start + self.batch_size])
            input_ids = np.array([e.ids for e in batch], dtype=np.int64)  # [b, T]
            attention_mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
            (embeddings,) = self.session.run(
                ["embeddings"], {"input_ids": input_ids, "attention_mask": attention_mask}
            )
            out[start : start + len(batch)] = embeddings
        return out
