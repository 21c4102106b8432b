"""Which models the quality benchmark trains, and why each one is there.

Three kinds of run, all on one data set:

- headline: every variant the issue asks about, `seeds` times each (training seed only; the
  split, and so the withheld cold-start items, is the same for all, so rows are paired);
- reference: id-only HSTU (and HSTU-large) with no items withheld, the protocol of the
  published numbers, so "is our HSTU as good as the paper's" compares like with like;
- ablation: one seed each, one knob changed from the seed-0 headline run it names as `base`.

"large-hybrid" trains the HSTU-large shape with the hybrid fusion that won on validation
(mean NDCG@10 over the headline seeds of hybrid-sum vs hybrid-alpha): it waits for those.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# Encoder shapes of the reference configs (model-anchors.md section 1).
SHAPES: dict[str, dict[str, int]] = {
    "base": {"num_blocks": 2, "num_heads": 1, "dqk": 50, "dv": 50},
    "large": {"num_blocks": 8, "num_heads": 2, "dqk": 25, "dv": 25},
}

# SID sets the prepare step builds: name -> (text, layers). Codes per layer are sized to the
# catalog (default_sid_shape: 64 for ML-1M). Layer counts 2 and 3 read the first layers of
# "full-L3"/"full-L4" through TrainConfig.sid_layers: residual k-means is greedy and seeded
# per layer, so the first L layers of a deeper build are exactly an L-layer build.
SID_SETS: dict[str, tuple[str, int]] = {
    "full-L3": ("full", 3),
    "full-L4": ("full", 4),
    "title-L3": ("title", 3),
}
# Item text per SID text kind: "full" is every field we have (plot, director, cast, ...),
# "title" is title (year) + genres, what a catalog without rich metadata would give.
TEXT_FIELDS: dict[str, tuple[str, ...] | None] = {"full": None, "title": ("year", "genres")}

HYBRID_FUSIONS = ("hybrid-sum", "hybrid-alpha", "hybrid-switch")


@dataclass(frozen=True)
class Run:
    name: str  # folder name, unique: "<group>.s<seed>"
    group: str  # the table row it belongs to
    kind: str  # headline | reference | ablation
    variant: str  # pipeline.VARIANTS key; "best-hybrid" is resolved when the run starts
    shape: str = "base"
    seed: int = 0
    sid_set: str = "full-L3"
    sid_layers: int | None = None  # None = every layer of the set
    cold_fraction: float = 0.05
    id_dropout: float = 0.2  # hybrid only (the pipeline default)
    use_time: bool = True
    negatives: str = "sequence"  # TrainConfig.negatives: one draw per sequence or per position
    base: str | None = None  # ablation: the headline group it differs from
    knob: str = ""  # ablation: what differs, for the table
    after: tuple[str, ...] = field(default=())  # groups that must finish first
    plan: str = "quality"  # which plan_* function the run belongs to (PLANS)
    # TrainConfig fields set by this run (tune plan), as (name, value) pairs
    settings: tuple[tuple[str, object], ...] = ()
    # tune plan: the run takes the settings of whichever of these groups has the best
    # validation NDCG@10 (resolved when it starts, like "best-hybrid")
    best_of: tuple[str, ...] = ()
    loss: str = "sampled-uniform"  # TrainConfig.loss (the quality plan keeps GR's reference)

    def as_dict(self) -> dict:
        return asdict(self)


def plan_runs(seeds: int = 3) -> list[Run]:
    """Every run of the benchmark, headline first."""
    if seeds < 1:
        raise ValueError("seeds must be at least 1")
    headline = [
        ("id", "id", "base"),
        ("sid-prefixn", "sid-prefixn", "base"),
        ("sid-rqsum", "sid-rqsum", "base"),
        ("hybrid-sum", "hybrid-sum", "base"),
        ("hybrid-alpha", "hybrid-alpha", "base"),
        ("hybrid-switch", "hybrid-switch", "base"),
        ("hybrid-tower", "hybrid-tower", "base"),
        ("large-id", "id", "large"),
    ]
    runs: list[Run] = []
    for seed in range(seeds):
        for group, variant, shape in headline:
            runs.append(Run(f"{group}.s{seed}", group, "headline", variant, shape, seed))
        runs.append(
            Run(
                f"large-hybrid.s{seed}",
                "large-hybrid",
                "headline",
                "best-hybrid",
                "large",
                seed,
                after=HYBRID_FUSIONS,
            )
        )
        for group, shape in (("ref-id", "base"), ("ref-large-id", "large")):
            runs.append(
                Run(f"{group}.s{seed}", group, "reference", "id", shape, seed, cold_fraction=0.0)
            )

    def ablation(group: str, base: str, knob: str, **changes: object) -> Run:
        variant = base
        return replace(
            Run(f"{group}.s0", group, "ablation", variant, base=base, knob=knob), **changes
        )

    for base in ("sid-prefixn", "hybrid-sum"):
        runs += [
            ablation(f"{base}:title-sids", base, "SIDs from title+year+genres", sid_set="title-L3"),
            ablation(f"{base}:2-layers", base, "2 SID layers", sid_layers=2),
            ablation(f"{base}:4-layers", base, "4 SID layers", sid_set="full-L4"),
        ]
    for rate in (0.0, 0.1, 0.4):
        runs.append(
            ablation(
                f"hybrid-sum:id-dropout-{rate}", "hybrid-sum", f"id dropout {rate}", id_dropout=rate
            )
        )
    for base in ("id", "hybrid-sum"):
        runs.append(ablation(f"{base}:no-time", base, "time features off", use_time=False))
    runs.append(
        ablation(
            "id:per-position-negatives",
            "id",
            "negatives drawn per position (the reference's sampling)",
            negatives="position",
        )
    )
    return runs


def run_config(run: Run, variant: tuple[str, str]) -> dict[str, object]:
    """TrainConfig fields of a run (variant = (ItemEmbedding variant, fusion))."""
    kind, fusion = variant
    return {
        "variant": kind,
        "fusion": fusion,
        "id_dropout": run.id_dropout if kind == "hybrid" else 0.0,
        "use_time": run.use_time,
        "negatives": run.negatives,
        "loss": run.loss,
        "sid_layers": run.sid_layers,
        "seed": run.seed,
        **SHAPES[run.shape],
        **dict(run.settings),
    }


# The tune plan (`sidrec bench tune`): id-only HSTU under the published protocol (no item
# withheld), GR's reference loss against the full and logQ-corrected sampled softmax, the two
# attention normalisations, then dropout, learning rate and weight decay around the best of
# those; the winner on validation gets the extra seeds; RecBole's SASRec is the peer.
REFERENCE_SETTINGS: dict[str, object] = {"loss": "sampled-uniform", "attn_norm": "padded"}
TUNE_GRID: dict[str, dict[str, object]] = {
    "full-length": {"loss": "full", "attn_norm": "length"},
    "full": {"loss": "full", "attn_norm": "padded"},
    "logq-length": {"loss": "sampled-logq", "attn_norm": "length"},
    "full-length-dropout-0.5": {"loss": "full", "attn_norm": "length", "dropout": 0.5},
    "full-length-lr-2e-3": {"loss": "full", "attn_norm": "length", "lr": 2e-3},
    "full-length-wd-0.1": {"loss": "full", "attn_norm": "length", "weight_decay": 0.1},
}
PEER = "recbole-sasrec"


def tune_runs(seeds: int = 3) -> list[Run]:
    """Every run of the tune plan: reference and peer per seed, the grid once (seed 0), then
    `tuned` seeds 1.. on the grid's validation winner (its seed 0 is the grid run itself)."""
    if seeds < 1:
        raise ValueError("seeds must be at least 1")

    def make(name: str, kind: str, seed: int, settings: dict[str, object], **extra) -> Run:
        return Run(f"{name}.s{seed}", name, kind, "id", seed=seed, cold_fraction=0.0,
                   plan="tune", settings=tuple(settings.items()), **extra)  # fmt: skip

    runs = [make(g, "grid", 0, settings) for g, settings in TUNE_GRID.items()]
    for seed in range(seeds):
        runs.append(make("ref-id", "reference", seed, REFERENCE_SETTINGS))
        runs.append(make(PEER, "peer", seed, {}))
    grid = tuple(TUNE_GRID)
    runs += [make("tuned", "tuned", s, {}, best_of=grid, after=grid) for s in range(1, seeds)]
    return runs


def plan_of(name: str, seeds: int) -> list[Run]:
    if name not in PLANS:
        raise ValueError(f"no plan named {name!r}; use {', '.join(PLANS)}")
    return PLANS[name](seeds)


PLANS = {"quality": plan_runs, "tune": tune_runs}
