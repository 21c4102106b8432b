"""The execution engines behind one interface (`Engine`): user encoder, SID -> vector, content
encoder.

SIDREC_ENGINE picks one: "onnx" (the default) runs the bundle's three ONNX graphs under ONNX
Runtime (`Runtime`); "torch" runs the user encoder and SID -> vector from the bundle's PyTorch
weights (model.pt) on the torch device, CPU or CUDA (service/torch_engine.py, imported only
then: the service needs no PyTorch otherwise). Both run the content encoder with ONNX Runtime.

All calls here block (ORT and PyTorch release the GIL while they compute): callers run them
in a thread pool, never on the event loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Literal, Protocol

import numpy as np
import onnxruntime as ort

from sidrec.bundle import Bundle
from sidrec.content_encoder import ContentEncoder

log = logging.getLogger("sidrec.service")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

EngineKind = Literal["onnx", "torch"]


class ProviderError(RuntimeError):
    """The requested execution provider is not available."""


class Engine(Protocol):
    """What the service calls to turn histories and new items into vectors, whatever runs them."""

    provider: str  # what the user encoder runs on, for /readyz and sidrec_model_info
    max_len: int
    d: int
    content_dim: int  # numbers new_item_vectors reads per item (bundle.new_item_content_dim)

    def encode_users(
        self,
        item_vectors: np.ndarray,  # float32 [B, N, d] raw, right padded
        timestamps: np.ndarray,  # int64 [B, N]
        mask: np.ndarray,  # bool [B, N]
        query_time: np.ndarray,  # int64 [B]
    ) -> np.ndarray:  # float32 [B, d], L2-normalised
        ...

    def new_item_vectors(self, codes: np.ndarray, content: np.ndarray) -> np.ndarray:
        """codes int64 [B, L + 1], content float32 [B, C] -> raw item vectors float32 [B, d]
        (bundles without a content tower read the codes only)."""
        ...

    def content_vectors(self, texts: list[str]) -> np.ndarray:
        """texts [B] -> float32 [B, D] L2-normalised content vectors."""
        ...


def load_engine(
    bundle: Bundle,
    engine: EngineKind = "onnx",
    device: str = "auto",
    ort_threads: int = 0,
    torch_threads: int = 0,
    content_threads: int = 0,
) -> Engine:
    """The engine SIDREC_ENGINE names, on SIDREC_DEVICE; content_threads 0 = ort_threads."""
    content_threads = content_threads or ort_threads
    if engine == "torch":
        return _torch_engine().TorchRuntime(
            bundle, device, ort_threads, torch_threads, content_threads
        )
    return Runtime(bundle, device, ort_threads, content_threads)


def check_engine(bundle: Bundle, engine: EngineKind, device: str, index: str) -> None:
    """Raise now what the engine or the index would raise in every worker: a missing
    provider, GPU, PyTorch or model.pt (BundleError or ProviderError, saying which)."""
    if engine == "torch" or index == "torch":
        _torch_engine().torch_device(device)
    if engine == "torch":
        _torch_engine().require_weights(bundle)
    else:
        choose_providers(device)


def _torch_engine() -> ModuleType:
    # PyTorch is imported only for SIDREC_ENGINE=torch or SIDREC_INDEX=torch.
    try:
        from . import torch_engine
    except ImportError as e:
        raise ProviderError(
            f"SIDREC_ENGINE=torch and SIDREC_INDEX=torch need PyTorch, which is not installed "
            f"({e}); install the torch extra (pip install 'sidrec[torch]')"
        ) from e
    return torch_engine


def choose_providers(device: str) -> list[str]:
    """ORT providers for a device setting: CUDA first when asked for or available, CPU always."""
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ProviderError(
            "SIDREC_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install the gpu extra, use auto/cpu, or "
            "SIDREC_ENGINE=torch (PyTorch on CUDA)"
        )
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def session_options(threads: int = 0) -> ort.SessionOptions:
    """The service's ORT session options; threads 0 = ORT's default (all cores)."""
    options = ort.SessionOptions()
    # ORT's pool threads spin between runs by default: on a small machine that takes the
    # cores the event loop and the other requests' threads need (serving benchmark, ML-1M,
    # 2 cores, SIDREC_ORT_THREADS=0: see docs/serving-benchmark.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


class OrtUserEncoder:
    """user_encoder.onnx under ONNX Runtime: the per-request half of `Runtime`, usable without
    the rest of a bundle (loadtests/gpu_bench.py)."""

    def __init__(self, path: Path, options: ort.SessionOptions, providers: list[str]) -> None:
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def encode_users(
        self,
        item_vectors: np.ndarray,  # float32 [B, N, d] raw, right padded
        timestamps: np.ndarray,  # int64 [B, N]
        mask: np.ndarray,  # bool [B, N]
        query_time: np.ndarray,  # int64 [B]
    ) -> np.ndarray:  # float32 [B, d], L2-normalised
        (user_vectors,) = self.session.run(
            ["user_vectors"],
            {
                "item_vectors": np.ascontiguousarray(item_vectors, dtype=np.float32),
                "timestamps": np.ascontiguousarray(timestamps, dtype=np.int64),
                "mask": np.ascontiguousarray(mask, dtype=np.bool_),
                "query_time": np.ascontiguousarray(query_time, dtype=np.int64),
            },
        )
        return user_vectors


class Runtime:
    """The ONNX Runtime engine (SIDREC_ENGINE=onnx)."""

    def __init__(
        self, bundle: Bundle, device: str = "auto", threads: int = 0, content_threads: int = 0
    ) -> None:
        providers = choose_providers(device)
        options = session_options(threads)
        self.users = OrtUserEncoder(bundle.file("user_encoder.onnx"), options, providers)
        self.user_encoder = self.users.session
        # new items' vectors: SID + content (a content tower) or SID alone, per the bundle
        self.new_items = ort.InferenceSession(
            str(bundle.file(bundle.new_item_graph)), options, providers=providers
        )
        self.new_items_read_content = len(self.new_items.get_inputs()) == 2
        self.content = ContentEncoder.of_bundle(
            bundle, providers, session_options(content_threads or threads)
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
        self.content_dim = bundle.new_item_content_dim

    def encode_users(
        self,
        item_vectors: np.ndarray,  # float32 [B, N, d] raw, right padded
        timestamps: np.ndarray,  # int64 [B, N]
        mask: np.ndarray,  # bool [B, N]
        query_time: np.ndarray,  # int64 [B]
    ) -> np.ndarray:  # float32 [B, d], L2-normalised
        return self.users.encode_users(item_vectors, timestamps, mask, query_time)

    def new_item_vectors(self, codes: np.ndarray, content: np.ndarray) -> np.ndarray:
        """codes int64 [B, L + 1], content float32 [B, C] -> raw item vectors float32 [B, d]."""
        feeds = {"codes": np.ascontiguousarray(codes, dtype=np.int64)}
        if self.new_items_read_content:
            feeds["content"] = np.ascontiguousarray(content, dtype=np.float32)
        (vectors,) = self.new_items.run(["vectors"], feeds)
        return vectors

    def content_vectors(self, texts: list[str]) -> np.ndarray:
        """texts [B] -> float32 [B, D] L2-normalised content vectors."""
        return self.content.encode(texts)
