"""The extraction configuration: every knob of a run, documented once, mapped onto the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Dtype = Literal["float32", "bfloat16"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
StoreDtype = Literal["float32", "bfloat16", "float16"]
AblationPositions = Literal["all", "last"]
AblationModeName = Literal["zero", "mean", "sink", "sink_norenorm"]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "repeat the following word: {word}",
    "echo the following word: {word}",
)


def choices(lit: Any) -> list[str]:
    """The values of a ``Literal[...]``, for ``click.Choice``."""
    return list(get_args(lit))


class ConfigError(ValueError):
    """A setting that cannot work, in one line that names the config fields involved in
    backquotes (`ablate_layers`, also listed in ``fields``); the CLI shows each as its flag."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction run. Fields marked (fingerprint) must match to resume a warehouse."""

    out: Path = Path("out/warehouse")
    """Warehouse directory to create (or continue, with ``resume``)."""
    model: str = DEFAULT_MODEL
    """(fingerprint) Hub id, local folder, or the alias ``smollm2-135m-instruct`` (embedded)."""
    dtype: Dtype = "float32"
    """(fingerprint) Dtype the model is loaded and run in."""
    device: DeviceChoice = "auto"
    """Where to run: ``auto`` picks cuda when available."""
    words: tuple[str, ...] | None = None
    """(fingerprint) The words; None means the 44 shipped default words."""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """(fingerprint) Prompt templates, each containing ``{word}``."""
    chat_template: bool = True
    """(fingerprint) Wrap each prompt in the tokenizer's chat template as a user turn."""
    chat_template_file: Path | None = None
    """(fingerprint) A Jinja chat template overriding the tokenizer's own."""
    system_prompt: str | None = None
    """(fingerprint) A system prompt; None keeps the chat template's default one."""
    prepend_bos: bool = False
    """(fingerprint) Put a BOS token at position 0 (the tokenizer's, or <|endoftext|>)."""
    max_new_tokens: int = 5
    """(fingerprint) Length of the greedy continuation stored per prompt."""
    top_k: int = 10
    """(fingerprint) Tokens kept per layer by the logit lens (and per ablation)."""
    store_dtype: StoreDtype = "float32"
    """(fingerprint) Dtype activations are stored in; float16 falls back per dataset on overflow."""
    head_out_all_positions: bool = False
    """(fingerprint) Also store per-head outputs at every position (L x T x H x D per prompt)."""
    batch_size: int | None = None
    """Prompts of equal length run together (no padding, so batching is exact); None sizes it
    from the device (32 on a CPU, see extract.models.sizing)."""
    resume: bool = False
    """Continue a warehouse made with the same fingerprint, skipping finished prompts."""
    allow_env_change: bool = False
    """Let ``resume`` continue in another environment (device, dtype, torch or transformers
    version than the run that made the warehouse); every run's environment is recorded."""
    ablation: tuple[AblationModeName, ...] = ("zero", "sink", "sink_norenorm")
    """(fingerprint) Ablation modes to run after extraction; empty for none."""
    ablate_positions: AblationPositions = "all"
    """(fingerprint) Remove a unit's output at every position, or at the last one only."""
    ablate_layers: tuple[int, ...] | None = None
    """(fingerprint) Layers whose heads and blocks are ablated; None = all layers."""
    patching: bool = False
    """(fingerprint) Run the activation-patching grid between template pairs (extract.stages.patching.metrics)."""
    patch_pairs: tuple[tuple[int, int], ...] | None = None
    """(fingerprint) Template pairs (a, b) to patch, both directions; None = the first two."""
    progress: bool = True
    """Show progress bars on stderr."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded in the manifest."""

    def __post_init__(self) -> None:
        validate(self)

    def fingerprint_parts(self, resolved: dict[str, Any]) -> dict[str, Any]:
        """What must match between a warehouse and a run that resumes it."""
        d = asdict(self)
        keep = {
            "dtype", "chat_template", "system_prompt", "prepend_bos", "max_new_tokens", "top_k",
            "store_dtype", "head_out_all_positions", "ablation", "ablate_positions",
            "ablate_layers",
        }
        if self.patching:  # absent when off: warehouses made before patching existed still resume
            keep |= {"patching", "patch_pairs"}
        parts = {k: d[k] for k in sorted(keep)}
        parts["templates"] = list(self.templates)
        for k, v in parts.items():
            if isinstance(v, tuple):
                parts[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        parts.update(resolved)  # model identity, words, tokenizer/template hashes
        return parts

    def as_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else
                    [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v)
                for k, v in d.items()}


def validate(cfg: ExtractConfig) -> None:
    """Every check a config can have without the model: ConfigError naming the field."""
    if cfg.chat_template is False:
        given = [f for f in ("system_prompt", "chat_template_file") if getattr(cfg, f) is not None]
        if given:
            raise ConfigError(f"{' and '.join(f'`{g}`' for g in given)} only apply with the chat template, "
                              "which `chat_template`=False switches off; drop one of them", *given, "chat_template")
    check_templates(cfg.templates)
    bad = [m for m in cfg.ablation if m not in choices(AblationModeName)]
    if bad:
        raise ConfigError(f"`ablation`: unknown mode(s) {', '.join(bad)}; choose from "
                          f"{', '.join(choices(AblationModeName))}", "ablation")
    if cfg.ablate_positions not in choices(AblationPositions):
        raise ConfigError(f"`ablate_positions` must be all or last, not {cfg.ablate_positions!r}",
                          "ablate_positions")
    if cfg.ablate_layers is not None and not cfg.ablate_layers:
        raise ConfigError("`ablate_layers` (none) is empty: give layers, or None for all", "ablate_layers")
    if cfg.patching:
        check_pairs(cfg.patch_pairs, len(cfg.templates))


def check_templates(templates: tuple[str, ...]) -> None:
    """At least one template, each with ``{word}`` once, all distinct."""
    if not templates:
        raise ConfigError("at least one template is needed (`templates` is empty)", "templates")
    for t in templates:
        if t.count("{word}") != 1:
            raise ConfigError(f"template {t!r} must contain {{word}} exactly once", "templates")
    if len(set(templates)) != len(templates):
        raise ConfigError("templates must be distinct", "templates")


def check_pairs(pairs: tuple[tuple[int, int], ...] | None, n_templates: int) -> None:
    """Template pairs to patch: distinct existing templates, each pair once (either order)."""
    if pairs is None:
        if n_templates < 2:
            raise ConfigError("patching needs at least two templates (`templates` twice)", "templates")
        return
    seen: list[tuple[int, int]] = []
    for a, b in pairs:
        if a == b:
            raise ConfigError(f"`patch_pairs`: {a}:{b} pairs a template with itself", "patch_pairs")
        bad = [x for x in (a, b) if not 0 <= x < n_templates]
        if bad:
            raise ConfigError(f"`patch_pairs`: template {bad[0]} does not exist (templates 0-{n_templates - 1})",
                              "patch_pairs")
        if (a, b) in seen or (b, a) in seen:
            raise ConfigError(f"`patch_pairs`: {a}:{b} is given twice (each pair runs both directions)",
                              "patch_pairs")
        seen.append((a, b))


def check_model_fit(cfg: ExtractConfig, n_layers: int) -> None:
    """The checks that need the model's shape: ablate_layers inside its layers."""
    if cfg.ablate_layers is None:
        return
    bad = [x for x in cfg.ablate_layers if not 0 <= x < n_layers]
    if bad:
        raise ConfigError(f"`ablate_layers` {','.join(map(str, bad))} is outside this model's "
                          f"layers 0-{n_layers - 1}", "ablate_layers")
