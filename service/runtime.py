"""The bundle's three ONNX graphs under ONNX Runtime: user encoder, SID -> vector, content encoder.

All calls here block (ORT releases the GIL while it computes): callers run them in a thread
pool, never on the event loop.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from sidrec.bundle import Bundle
from sidrec.content_encoder import ContentEncoder

log = logging.getLogger("sidrec.service")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The requested execution provider is not available."""


def choose_providers(device: str) -> list[str]:
    """ORT providers for a device setting: CUDA first when asked for or available, CPU always."""
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ProviderError(
            "SIDREC_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install the gpu extra or use auto/cpu"
        )
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class Runtime:
    def __init__(self, bundle: Bundle, device: str = "auto", threads: int = 0) -> None:
        providers = choose_providers(device)
        options = ort.SessionOptions()
        # ORT's pool threads spin between runs by default: on a small machine that takes the
        # cores the event loop and the other requests' threads need (serving benchmark, ML-1M,
        # 2 cores, SIDREC_ORT_THREADS=0: see docs/serving-benchmark.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.user_encoder = ort.InferenceSession(
            str(bundle.file("user_encoder.onnx")), options, providers=providers
        )
        self.sid_to_vector = ort.InferenceSession(
            str(bundle.file("sid_to_vector.onnx")), options, providers=providers
        )
        self.content = ContentEncoder(
            bundle.file("content_encoder.onnx"),
            bundle.file("tokenizer.json"),
            providers,
            session_options=options,
        )
        # What ORT actually runs on: a CUDA provider that failed to load silently falls back
        # to CPU, and /readyz + sidrec_model_info must show that.
        self.provider = self.user_encoder.get_providers()[0]
        if CUDA in providers and self.provider != CUDA:
            log.warning(
                "CUDA provider requested but ORT runs the user encoder on %s", self.provider
            )
        self.max_len = int(bundle.model["max_len"])
        self.d = int(bundle.model["d"])
        self.content_dim = int(bundle.manifest["content"]["dim"])

    def encode_users(
        self,
        item_vectors: np.ndarray,  # float32 [B, N, d] raw, right padded
        timestamps: np.ndarray,  # int64 [B, N]
        mask: np.ndarray,  # bool [B, N]
        query_time: np.ndarray,  # int64 [B]
    ) -> np.ndarray:  # float32 [B, d], L2-normalised
        (user_vectors,) = self.user_encoder.run(
            ["user_vectors"],
            {
                "item_vectors": np.ascontiguousarray(item_vectors, dtype=np.float32),
                "timestamps": np.ascontiguousarray(timestamps, dtype=np.int64),
                "mask": np.ascontiguousarray(mask, dtype=np.bool_),
                "query_time": np.ascontiguousarray(query_time, dtype=np.int64),
            },
        )
        return user_vectors

    def vectors_from_sids(self, codes: np.ndarray) -> np.ndarray:
        """codes int64 [B, L + 1] -> raw item vectors float32 [B, d]."""
        (vectors,) = self.sid_to_vector.run(
            ["vectors"], {"codes": np.ascontiguousarray(codes, dtype=np.int64)}
        )
        return vectors

    def content_vectors(self, texts: list[str]) -> np.ndarray:
        """texts [B] -> float32 [B, D] L2-normalised content vectors."""
        return self.content.encode(texts)
