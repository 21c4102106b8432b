"""The benchmark's CPU step: content vectors, every SID set of the plan, the baselines.

Needs MiniLM and faiss, which a GPU training machine may not have; training needs neither,
only out/prepared/ (a few MB) and the data folder.

out/prepared/
  content-<text>.npy          MiniLM vectors per text kind (plan.TEXT_FIELDS)
  texts.json                  the fields each text kind used on this data, and why if not its own
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


def text_fields(catalog: Catalog, text: str) -> tuple[tuple[str, ...] | None, str]:
    """(fields the `text` kind embeds on this catalog, None = every field; a note, "" when
    the kind gets its own fields). A kind whose fields no item has (e.g. "title" = title +
    year + genres on a product catalog with only title + category text) falls back to every
    field the items have, so its SIDs are not built from the bare title without anyone
    having asked for that; the note says so."""
    keep = TEXT_FIELDS[text]
    if keep is None:
        return None, ""
    wanted = {k.lower() for k in keep}
    present = sorted({k for f in catalog.fields for k, v in f.items() if v})
    if any(k.lower() in wanted for k in present):
        return keep, ""
    return None, (
        f"'{text}' text: no item has {' or '.join(keep)}; using the title and every field "
        f"the items have ({', '.join(present) or 'none'}), i.e. the same text as 'full'"
    )


def catalog_texts(catalog: Catalog, text: str) -> list[str]:
    from sidrec.item_text import item_text
    from sidrec.offline.content import catalog_texts as full_texts

    keep, _ = text_fields(catalog, text)
    if keep is None:
        return full_texts(catalog)
    wanted = {k.lower() for k in keep}
    return [
        item_text(t, {k: v for k, v in f.items() if k.lower() in wanted})
        for t, f in zip(catalog.titles, catalog.fields, strict=True)
    ]


def _forget(folder: Path, text: str) -> None:
    """Removes the vectors of text kind `text` and the SID sets built from them (stale)."""
    names = [f"content-{text}.npy"]
    for name, (set_text, _) in SID_SETS.items():
        if set_text == text:
            names += [f"sids-{name}.npy", f"codebooks-{name}.npz", f"sid-report-{name}.json"]
    for name in names:
        (folder / name).unlink(missing_ok=True)


def prepare(
    data_dir: Path, out: Path, cache_dir: Path | None, log: Callable[[str], None] = print
) -> Path:
    """Write out/prepared/ (skipping files already there); returns that folder."""
    from sidrec.offline.baselines import content_only_baseline, most_popular_scorer
    from sidrec.offline.content import encode_texts
    from sidrec.offline.data.load import load_dataset
    from sidrec.offline.evaluate import evaluate
    from sidrec.offline.sids import build_sids, default_sid_shape, sid_report
    from sidrec.offline.split import make_split

    folder = out / PREPARED
    folder.mkdir(parents=True, exist_ok=True)
    data = load_dataset(data_dir)
    vectors: dict[str, np.ndarray] = {}
    used: dict[str, dict[str, object]] = {}
    texts_path = folder / "texts.json"
    before = json.loads(texts_path.read_text()) if texts_path.is_file() else {}
    for text, own in TEXT_FIELDS.items():
        keep, note = text_fields(data.catalog, text)
        used[text] = {"fields": "all" if keep is None else list(keep), "note": note}
        if note:
            log(f"note: {note}")
        # A folder prepared before the fallback existed embedded the kind's own fields.
        was = before.get(text, {"fields": "all" if own is None else list(own)})["fields"]
        if was != used[text]["fields"]:
            _forget(folder, text)
        path = folder / f"content-{text}.npy"
        if not path.is_file():
            log(f"encoding {data.num_items:,} items ({text} text) with MiniLM")
            np.save(path, encode_texts(catalog_texts(data.catalog, text), cache_dir))
        vectors[text] = np.load(path)
    texts_path.write_text(json.dumps(used, indent=2) + "\n")

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
        content_only, choice = content_only_baseline(vectors["full"], split)
        scorers = {"most-popular": most_popular_scorer(split), "content-only": content_only}
        results = {
            name: {stage: evaluate(scorer, split, stage) for stage in ("valid", "test")}
            for name, scorer in scorers.items()
        }
        for report in results["content-only"].values():
            report["history_half_life"] = choice
        path.write_text(json.dumps(results, indent=2) + "\n")
        log("baselines: most-popular, content-only")
    return folder
