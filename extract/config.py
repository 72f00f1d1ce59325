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
        from extract.stages.prompts import check_chat_options

        check_chat_options(chat=self.chat_template, system_prompt=self.system_prompt,
                           chat_template_file=self.chat_template_file)

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
