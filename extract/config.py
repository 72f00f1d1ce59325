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
CircuitKind = Literal["template", "word"]
CircuitMethod = Literal["eap", "eap_ig_inputs", "eap_ig_activations"]
CircuitReplacement = Literal["patch", "mean", "zero"]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "repeat the following word: {word}",
    "echo the following word: {word}",
)


def choices(lit: Any) -> list[str]:
    """The values of a ``Literal[...]``, for ``click.Choice``."""
    return list(get_args(lit))


def field_docs(cls: type | None = None) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body), whitespace collapsed: the
    one place a setting is documented (``echowh extract --help`` shows it)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls or ExtractConfig)).body[0].body  # type: ignore[attr-defined]
    out = {}
    for a, b in zip(body, body[1:], strict=False):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            out[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[union-attr]
    return out


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
    """Warehouse directory to write (or continue, with resume)."""
    model: str = DEFAULT_MODEL
    """(fingerprint) Hub id (e.g. Qwen/Qwen2.5-1.5B-Instruct), a local model folder, or the embedded
    aliases smollm2-135m-instruct and gemma3-270m (converted once into $ECHOWH_CACHE; gemma3-270m
    is a base model and defaults to raw few-shot prompts)."""
    dtype: Dtype = "float32"
    """(fingerprint) Dtype to load and run the model in."""
    device: DeviceChoice = "auto"
    """Where the model runs: auto picks cuda when torch sees a GPU, else cpu."""
    words: tuple[str, ...] | None = None
    """(fingerprint) The words (on the command line a word file: one word per line, # comments
    allowed). Default (None): the 44 shipped common words."""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """(fingerprint) Prompt templates, each containing {word}; several may be given. Default:
    repeat the following word: {word} | echo the following word: {word}"""
    chat_template: bool = True
    """(fingerprint) Wrap each prompt in the tokenizer's chat template as a user turn (off: feed the
    raw prompt)."""
    chat_template_file: Path | None = None
    """(fingerprint) Jinja chat template file overriding the tokenizer's."""
    system_prompt: str | None = None
    """(fingerprint) System prompt (default: the chat template's own default)."""
    prepend_bos: bool = False
    """(fingerprint) Put a BOS token at position 0 (<|endoftext|> for Qwen)."""
    max_new_tokens: int = 5
    """(fingerprint) Greedy continuation length stored per prompt."""
    top_k: int = 10
    """(fingerprint) Tokens kept per layer by the logit lens and per ablation."""
    store_dtype: StoreDtype = "float32"
    """(fingerprint) Dtype activations are stored in (float16 keeps float32 where values overflow)."""
    head_out_all_positions: bool = False
    """(fingerprint) Also store per-head outputs at every position (large: L x T x H x D per prompt)."""
    batch_size: int | None = None
    """Prompts of equal length run together (no padding: exact). Default: from the device (32 on a
    CPU; on a GPU from its memory and the model's shape; extract.models.sizing)."""
    resume: bool = False
    """Continue a warehouse made with the same model and prompt set, skipping finished prompts (a
    killed run loses nothing it had finished)."""
    allow_env_change: bool = False
    """With resume: continue even if the device, dtype, torch or transformers version differs from
    the run that made the warehouse (refused otherwise; every run's environment is recorded in the
    manifest)."""
    ablation: tuple[AblationModeName, ...] = ("zero", "sink", "sink_norenorm")
    """(fingerprint) Ablation modes after extraction, or none: zero, mean (a unit's output replaced
    by 0 or its mean), sink (each head's attention to position 0 removed, weights renormalised over
    the other keys; unit H: every head of the layer), sink_norenorm (the same without
    renormalising: position 0's value contribution removed)."""
    ablate_positions: AblationPositions = "all"
    """(fingerprint) Remove a unit's output (a head, or a whole attention or MLP block) at every
    position, or only at the last one (reuses the clean keys and values: faster)."""
    ablate_layers: tuple[int, ...] | None = None
    """(fingerprint) Blocks to ablate, 0-based. Default (None): all."""
    patching: bool = False
    """(fingerprint) Run the activation-patching grid after extraction: for each word and template
    pair, patch every residual (boundary, position), attention/MLP block output, and head (all
    positions and per position) from one prompt into the other, both directions, exact and
    attribution (stored under patching/). Off by default: see README 'Activation patching'."""
    patch_pairs: tuple[tuple[int, int], ...] | None = None
    """(fingerprint) Template pairs to patch, 0-based; both directions run for each. Default: 0:1
    (the first two templates). Implies nothing without patching."""
    circuits: tuple[CircuitKind, ...] = ()
    """(fingerprint) Edge attribution and circuits (stored under circuits/): template (each word
    under the first two templates, both directions) and/or word (the same template with the next
    word of equal token length and another first token). Per pair: one forward+backward per
    method and IG step, then one forward per circuit (2 selections x 2 metrics x 9 sizes x
    methods x replacements, plus 100 single edges). Cost with the defaults on SmolLM2, measured
    on one CPU core: about 110 s per pair (scores 11 s, the faithfulness sweep 99 s); make
    circuits (4 words, up to 16 pairs) about 30 core-minutes (README 'Running circuits and task
    vectors'). Off by default."""
    circuit_methods: tuple[CircuitMethod, ...] = ("eap", "eap_ig_inputs")
    """(fingerprint) Attribution methods stored (eap always runs: the invariants need it).
    eap_ig_activations costs about 3 x n_layers x circuit_steps backward passes per pair (some 20x
    eap_ig_inputs): opt in. A method not asked for is stored as 0."""
    circuit_steps: int = 5
    """(fingerprint) Integrated-gradient steps m of EAP-IG (m forward+backward passes per method;
    m = 1 is eap)."""
    circuit_replacements: tuple[CircuitReplacement, ...] = ("patch",)
    """(fingerprint) What an edge outside a circuit carries: patch (the counterfactual's value), mean
    (the node's mean over every clean prompt), zero. Each adds one forward per circuit."""
    task_vectors: bool = False
    """(fingerprint) Task vectors, function vectors and steering (stored under taskvec/): vectors
    from the even-indexed (train) words, per-head AIE and every intervention on the odd-indexed
    (held-out) words. Cost per held-out word on SmolLM2, measured on one CPU core: about 19 s
    (AIE 2 s, last-position interventions 6 s, from-verb steering 12 s at tv_steer_stride 1), so
    about 7 minutes for the 44 default words (22 held out). Off by default."""
    tv_demos: int = 5
    """(fingerprint) Demonstrations in a task-vector prompt (needs more than this many train words)."""
    tv_coefficients: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    """(fingerprint) Steering coefficients c, each run at every boundary in both directions and both
    position modes (0 reproduces the clean run: a stored invariant)."""
    tv_steer_stride: int = 1
    """(fingerprint) Steer from the verb on at every boundary b with b % stride == 0 (1: every
    boundary). These rows recompute every position from the verb: 12 of SmolLM2's 19 s per
    held-out word at stride 1, about 3 s at stride 4. Last-position steering always runs at every
    boundary."""
    progress: bool = True
    """Show progress bars on stderr."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded in the manifest (the CLI records its command line)."""

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
        if self.circuits:  # likewise for circuits and task vectors
            keep |= {"circuits", "circuit_methods", "circuit_steps", "circuit_replacements"}
        if self.task_vectors:
            keep |= {"task_vectors", "tv_demos", "tv_coefficients", "tv_steer_stride"}
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
    check_circuits(cfg)
    check_task_vectors(cfg)


def _check_choices(cfg: ExtractConfig, name: str, lit: Any) -> None:
    bad = [x for x in getattr(cfg, name) if x not in choices(lit)]
    if bad:
        raise ConfigError(f"`{name}`: unknown value(s) {', '.join(map(str, bad))}; choose from "
                          f"{', '.join(choices(lit))}", name)


def check_circuits(cfg: ExtractConfig) -> None:
    """Circuit kinds, methods, replacements and IG steps that can run."""
    for name, lit in (("circuits", CircuitKind), ("circuit_methods", CircuitMethod),
                      ("circuit_replacements", CircuitReplacement)):
        _check_choices(cfg, name, lit)
    if not cfg.circuits:
        return
    if "template" in cfg.circuits and len(cfg.templates) < 2:
        raise ConfigError("template circuits need at least two templates (`templates` twice), or use `circuits`=word",
                          "circuits", "templates")
    if not cfg.circuit_methods:
        raise ConfigError("`circuit_methods` is empty: give at least eap", "circuit_methods")
    if not cfg.circuit_replacements:
        raise ConfigError("`circuit_replacements` is empty: give at least patch", "circuit_replacements")
    if cfg.circuit_steps < 1:
        raise ConfigError(f"`circuit_steps` must be >= 1, not {cfg.circuit_steps}", "circuit_steps")


def check_task_vectors(cfg: ExtractConfig) -> None:
    """Demonstrations, coefficients and the steering stride of the task-vector study."""
    if not cfg.task_vectors:
        return
    if cfg.tv_demos < 1:
        raise ConfigError(f"`tv_demos` must be >= 1, not {cfg.tv_demos}", "tv_demos")
    if not cfg.tv_coefficients or any(c < 0 for c in cfg.tv_coefficients):
        raise ConfigError("`tv_coefficients` must be one or more values >= 0 (the sign is the direction)",
                          "tv_coefficients")
    if cfg.tv_steer_stride < 1:
        raise ConfigError(f"`tv_steer_stride` must be >= 1, not {cfg.tv_steer_stride}", "tv_steer_stride")
    n = len(cfg.words) if cfg.words is not None else None  # the shipped words are enough
    if n is not None and (n + 1) // 2 < cfg.tv_demos + 1:
        raise ConfigError(f"`tv_demos`={cfg.tv_demos} needs {cfg.tv_demos + 1} train words (even-indexed), "
                          f"`words` gives {(n + 1) // 2}: pass more words or fewer demonstrations",
                          "tv_demos", "words")


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
