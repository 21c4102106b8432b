"""PyTorch in the service: the torch engine (SIDREC_ENGINE=torch) and the torch top-k index
(SIDREC_INDEX=torch), on the CPU or a CUDA GPU (SIDREC_DEVICE).

Imported only when one of those settings asks for it, so a service on ONNX Runtime and FAISS
never loads PyTorch (the `torch` extra installs it). The engine runs the bundle's model.pt with
the model code it was trained with (sidrec.model) and takes and returns the same numpy arrays
as ONNX Runtime, so the batcher, the catalog and loadtests/gpu_bench.py cannot tell the
engines apart. The content encoder stays on ONNX Runtime: it is not on the request path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sidrec.bundle import TORCH_WEIGHTS, Bundle, BundleError
from sidrec.model.weights import load_weights

# ONNX Runtime (service/runtime.py, the content encoder) is imported where it is used:
# TorchModel and TorchTopK run with numpy and PyTorch alone (loadtests/gpu_bench.py).

log = logging.getLogger("sidrec.service")


def torch_device(setting: str) -> torch.device:
    """SIDREC_DEVICE (auto | cpu | cuda) -> the torch device; cuda fails without a GPU."""
    if setting == "cuda" and not torch.cuda.is_available():
        from .runtime import ProviderError

        raise ProviderError(
            f"SIDREC_DEVICE=cuda but PyTorch sees no CUDA GPU (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}); use SIDREC_DEVICE=auto or cpu"
        )
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def require_weights(bundle: Bundle) -> None:
    """BundleError unless the bundle lists model.pt (so load_bundle checked its sha256)."""
    if not bundle.lists(TORCH_WEIGHTS):
        raise BundleError(
            f"{bundle.path}: SIDREC_ENGINE=torch needs {TORCH_WEIGHTS} (the PyTorch weights) "
            "and this bundle has none (exported before `sidrec export` wrote it); export the "
            "bundle again, or serve this one with SIDREC_ENGINE=onnx"
        )


def _tensor(array: np.ndarray, dtype: np.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(device)


class TorchModel:
    """model.pt on one torch device, with the ONNX graphs' numpy-in, numpy-out signatures."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.device = device
        self.items, self.encoder, self.tower = load_weights(path, device)
        self.d = self.items.d

    @torch.inference_mode()
    def encode_users(
        self,
        item_vectors: np.ndarray,  # float32 [B, N, d] raw, right padded
        timestamps: np.ndarray,  # int64 [B, N]
        mask: np.ndarray,  # bool [B, N]
        query_time: np.ndarray,  # int64 [B]
    ) -> np.ndarray:  # float32 [B, d], L2-normalised
        users = self.encoder(
            _tensor(item_vectors, np.float32, self.device),
            _tensor(timestamps, np.int64, self.device),
            _tensor(mask, np.bool_, self.device),
            _tensor(query_time, np.int64, self.device),
        )
        return users.cpu().numpy()

    @torch.inference_mode()
    def new_item_vectors(self, codes: np.ndarray, content: np.ndarray) -> np.ndarray:
        """codes int64 [B, L + 1], content float32 [B, C] -> raw item vectors float32 [B, d]."""
        codes_t = _tensor(codes, np.int64, self.device)
        if self.tower is not None:
            return self.tower(codes_t, _tensor(content, np.float32, self.device)).cpu().numpy()
        if self.items.has_content_part:
            content_t = _tensor(content, np.float32, self.device)
            return self.items.from_sid(codes_t, content_t).cpu().numpy()
        return self.items.from_sid(codes_t).cpu().numpy()


class TorchRuntime:
    """The torch engine: an `Engine` (service/runtime.py) over the bundle's model.pt."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        ort_threads: int = 0,
        torch_threads: int = 0,
        content_threads: int = 0,
    ) -> None:
        require_weights(bundle)
        import onnxruntime as ort

        from sidrec.content_encoder import ContentEncoder

        from .runtime import CPU, CUDA, session_options

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch_device(device)
        self.model = TorchModel(bundle.file(TORCH_WEIGHTS), self.device)
        self.max_len = int(bundle.model["max_len"])
        self.d = int(bundle.model["d"])
        if self.model.d != self.d:
            raise BundleError(
                f"{bundle.file(TORCH_WEIGHTS)}: d={self.model.d}, manifest.json says {self.d}"
            )
        self.content_dim = bundle.new_item_content_dim
        # The content encoder is ONNX only; it takes ORT's CUDA provider where one is
        # installed and the CPU otherwise, never failing the torch engine's start for it.
        content_providers = [CPU]
        if self.device.type == "cuda" and CUDA in ort.get_available_providers():
            content_providers = [CUDA, CPU]
        self.content = ContentEncoder.of_bundle(
            bundle, content_providers, session_options(content_threads or ort_threads)
        )
        self.provider = f"torch-{self.device.type}"
        log.info("torch engine: torch %s on %s", torch.__version__, self.device)

    def encode_users(
        self,
        item_vectors: np.ndarray,
        timestamps: np.ndarray,
        mask: np.ndarray,
        query_time: np.ndarray,
    ) -> np.ndarray:
        return self.model.encode_users(item_vectors, timestamps, mask, query_time)

    def new_item_vectors(self, codes: np.ndarray, content: np.ndarray) -> np.ndarray:
        return self.model.new_item_vectors(codes, content)

    def content_vectors(self, texts: list[str]) -> np.ndarray:
        return self.content.encode(texts)


class TorchTopK:
    """Exact inner-product top-k over rows held on a torch device, with the two FAISS index
    calls ItemTable makes (`add`, `search`), so SIDREC_INDEX=torch is IndexFlatIP's ranking
    computed where the model runs. Rows go into a buffer that doubles when full: adding an
    ingested item copies one row, not the table."""

    # Scores computed at once at most: the [queries, rows] score matrix stays under 256 MiB
    # (float32) however large the batch and the catalog.
    MAX_SCORES = 1 << 26

    def __init__(self, d: int, device: torch.device) -> None:
        self.d = d
        self.device = device
        self.ntotal = 0
        self._rows = torch.zeros((16, d), dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, vectors: np.ndarray) -> None:
        """vectors float32 [n, d] (L2-normalised) -> rows ntotal .. ntotal + n - 1."""
        new = _tensor(vectors, np.float32, self.device).reshape(-1, self.d)
        end = self.ntotal + len(new)
        if end > len(self._rows):
            grown = torch.zeros(
                (max(end, 2 * len(self._rows)), self.d), dtype=torch.float32, device=self.device
            )
            grown[: self.ntotal] = self._rows[: self.ntotal]
            self._rows = grown
        self._rows[self.ntotal : end] = new
        self.ntotal = end

    @torch.no_grad()
    def search(
        self, queries: np.ndarray, k: int, params: object = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [B, d] -> (scores float32 [B, k], rows int64 [B, k]), best first.
        `params` is FAISS's per-search knob; an exact scan has none."""
        rows = self._rows[: self.ntotal]
        chunk = max(1, self.MAX_SCORES // max(self.ntotal, 1))
        scores, found = [], []
        for part in _tensor(queries, np.float32, self.device).split(chunk):
            top = torch.topk(part @ rows.T, k, dim=1)  # sorted: best first
            scores.append(top.values)
            found.append(top.indices)
        return torch.cat(scores).cpu().numpy(), torch.cat(found).cpu().numpy()
