"""The benchmark's CPU step: content vectors, every SID set of the plan, the baselines.

Needs MiniLM and faiss, which a GPU training machine may not have; training needs neither,
only out/prepared/ (a few MB) and the data folder.

out/prepared/
  content-<text>.npy          MiniLM vectors per text kind (plan.TEXT_FIELDS)
  sids-<set>.npy, codebooks-<set>.npz, sid-report-<set>.json
  baselines.json              most-popular and content-only, valid + test, on the headline split
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sidrec.offline.bench.plan import SID_SETS, TEXT_FIELDS
from sidrec.offline.bench.runner import PREPARED, SPLIT_SEED
from sidrec.offline.data.dataset import Catalog


def catalog_texts(catalog: Catalog, text: str) -> list[str]:
    from sidrec.item_text import item_text
    from sidrec.offline.content import catalog_texts as full_texts

    keep = TEXT_FIELDS[text]
    if keep is None:
        return full_texts(catalog)
    return [
        item_text(t, {k: v for k, v in f.items() if k in keep})
        for t, f in zip(catalog.titles, catalog.fields, strict=True)
    ]


def prepare(
    data_dir: Path, out: Path, cache_dir: Path | None, log: Callable[[str], None] = print
) -> Path:
    """Write out/prepared/ (skipping files already there); returns that folder."""
    from sidrec.offline.baselines import content_scorer, most_popular_scorer
    from sidrec.offline.content import encode_texts
    from sidrec.offline.data.load import load_dataset
    from sidrec.offline.evaluate import evaluate
    from sidrec.offline.sids import build_sids, default_sid_shape, sid_report
    from sidrec.offline.split import make_split

    folder = out / PREPARED
    folder.mkdir(parents=True, exist_ok=True)
    data = load_dataset(data_dir)
    vectors: dict[str, np.ndarray] = {}
    for text in TEXT_FIELDS:
        path = folder / f"content-{text}.npy"
        if not path.is_file():
            log(f"encoding {data.num_items:,} items ({text} text) with MiniLM")
            np.save(path, encode_texts(catalog_texts(data.catalog, text), cache_dir))
        vectors[text] = np.load(path)

    _, codes = default_sid_shape(data.num_items)
    for name, (text, layers) in SID_SETS.items():
        if (folder / f"sids-{name}.npy").is_file():
            continue
        codebooks, sids = build_sids(vectors[text], layers, codes, seed=0)
        np.save(folder / f"sids-{name}.npy", sids)
        codebooks.save(folder / f"codebooks-{name}.npz")
        report = sid_report(sids, data.catalog.genres, codebooks)
        (folder / f"sid-report-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"SIDs {name}: {layers} x {codes} codes from {text} text")

    path = folder / "baselines.json"
    if not path.is_file():
        split = make_split(data, cold_fraction=0.05, seed=SPLIT_SEED)
        scorers = {
            "most-popular": most_popular_scorer(split),
            "content-only": content_scorer(vectors["full"]),
        }
        results = {
            name: {stage: evaluate(scorer, split, stage) for stage in ("valid", "test")}
            for name, scorer in scorers.items()
        }
        path.write_text(json.dumps(results, indent=2) + "\n")
        log("baselines: most-popular, content-only")
    return folder
