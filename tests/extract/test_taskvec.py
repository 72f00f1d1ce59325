"""extract.stages.taskvec against independent computations (docs/specs/taskvec.md).

- every edit kind of the engine (residual set / add / self-patch at the last position, add from
  the verb on, a head's o_proj-input slice) == one hooked HF forward per edit (forward hooks on
  the HF modules, not the engine) at 1e-4 relative to max(1, max |logit|), on a tiny random model
  of every family (qwen2, llama and the five further ones) and, slow, on SmolLM2;
- the vectors (TV, SV, z-bar, head mean outputs, FV_k) == the HF forward's hidden states and
  o_proj inputs read by hooks, at 1e-4;
- the AIE of a head == the mean over held-out words of a hooked forward's P(target) change with
  that head's mean slice put in through a hook on o_proj's input (1e-4 absolute on probabilities);
- the metrics == their definitions recomputed from hooked logits;
- c = 0 and self-patches reproduce the engine's clean reference (the edited input is the clean
  one bit for bit; batch rows may round apart: 1e-6 relative); the clean reference == the
  model's plain forward at 1e-4;
- train/held-out separation: demonstrations come from train words only, never the query, and no
  vector is evaluated on a word it was built from.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from extract.models.families import Adapter
from extract.models.loading import load_model
from extract.stages.prompts import choose_target
from extract.stages.taskvec import (
    build_set,
    build_vectors,
    edit_for,
    function_vectors,
    plan_aie,
    run_group,
    run_rows,
)
from extract.stages.taskvec.interventions import Row
from store.taskvec_schema import Kind, Method, Where

TOL = 1e-4
# 4 train (cat, house, tree, sun), 4 held out; "xylophone" splits into several tokens, so one
# held-out prompt of each kind is longer than the others (two length groups).
WORDS = ["cat", "dog", "house", "xylophone", "tree", "book", "sun", "moon"]
N_DEMOS = 3


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    err = float((a.double() - b.double()).abs().max()) / max(1.0, float(b.abs().max()))
    assert err <= tol, err
    return err


SYSTEM = "Be brief."  # a short system prompt keeps the chat prompts (and the tests) short
_SETUP: dict[str, tuple] = {}


def _setup(path: str):
    """(adapter, tokenizer, prompt set, train vectors) of a model folder, built once per session."""
    if path not in _SETUP:
        model, tok, _ = load_model(path, device="cpu", progress=False)
        ad = Adapter(model)
        ps = build_set(tok, WORDS, n_demos=N_DEMOS, system_prompt=SYSTEM)
        _SETUP[path] = (ad, tok, ps, build_vectors(ad, ps))
    return _SETUP[path]


# -- the independent reference: one hooked HF forward per edit --------------------------------


@contextmanager
def _hooked(ad: Adapter, row: Row, edit, positions: slice):
    """Forward hooks on the HF modules applying one row: the residual entering decoder layer
    ``row.layer`` at ``positions``, or head ``row.head``'s slice of o_proj's input at the last token."""
    if row.method == Method.HEAD_MEAN:
        hd = ad.arch.head_dim
        cols = slice(row.head * hd, (row.head + 1) * hd)

        def pre_o(mod, args):
            x = args[0].clone()
            x[:, -1, cols] = edit.z
            return (x,)

        handle = ad.o_proj(row.layer).register_forward_pre_hook(pre_o)
    else:
        def change(x):
            x = x.clone()
            old = x[:, positions]
            if row.method == Method.SELF_PATCH:
                new = old.clone()
            elif row.method == Method.TASK_VECTOR:
                new = edit.add.expand_as(old)
            else:  # FUNCTION_VECTOR, STEER: added
                new = old + edit.add
            x[:, positions] = new
            return x

        def pre_layer(mod, args, kw):
            if args:
                return (change(args[0]), *args[1:]), kw
            return args, {**kw, "hidden_states": change(kw["hidden_states"])}

        handle = ad.layers[row.layer].register_forward_pre_hook(pre_layer, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _hf(ad: Adapter, ids) -> torch.Tensor:
    return ad.model(input_ids=torch.tensor([list(ids)]), logits_to_keep=1).logits[0, -1].float()


def _sample_rows(L: int, H: int) -> dict[tuple[Kind, Where], list[Row]]:
    """A few rows of every edit kind, at the first, a middle and the last boundary/block."""
    bs = sorted({0, L // 2, L - 1})
    return {
        (Kind.ZERO_SHOT, Where.LAST): [Row(Method.TASK_VECTOR, Kind.ZERO_SHOT, b, source=Kind.DEMO) for b in bs]
        + [Row(Method.SELF_PATCH, Kind.ZERO_SHOT, L // 2), Row(Method.FUNCTION_VECTOR, Kind.ZERO_SHOT, 1, k=5)],
        (Kind.NEUTRAL, Where.LAST): [Row(Method.TASK_VECTOR, Kind.NEUTRAL, b, source=Kind.REPEAT) for b in bs],
        (Kind.ECHO, Where.FROM_VERB): [Row(Method.STEER, Kind.ECHO, b, Where.FROM_VERB, coef=4.0) for b in bs]
        + [Row(Method.STEER, Kind.ECHO, 1, Where.FROM_VERB, coef=0.0)],
        (Kind.REPEAT, Where.LAST): [Row(Method.STEER, Kind.REPEAT, b, coef=8.0) for b in bs],
        (Kind.SHUFFLED, Where.LAST): [Row(Method.HEAD_MEAN, Kind.SHUFFLED, lay, head=h)
                                      for lay, h in ((0, 0), (L // 2, H // 2), (L - 1, H - 1))],
    }


def _engine_equals_hooked(ad: Adapter, ps, vec, rows_per_pass: int | None, n_words: int = 4) -> float:
    """Assert every sampled edit == its hooked forward; return the worst relative error."""
    a = ad.arch
    L, H = a.n_layers, a.n_heads
    fv = function_vectors(vec, torch.arange(L * H, dtype=torch.float32).view(L, H))
    rope = ad.rope(max(p.n_tokens for p in ps.prompts.values()))
    moved = worst = 0.0
    for (kind, where), rows in _sample_rows(L, H).items():
        edits = [edit_for(r, vec, fv) for r in rows]
        by_len: dict[int, list] = {}
        for p in ps.of(kind, ps.split.held_out[:n_words]):
            by_len.setdefault(p.n_tokens, []).append(p)
        for group in by_len.values():
            start = group[0].verb_pos if where == Where.FROM_VERB else group[0].n_tokens - 1
            got: dict[tuple[int, int], torch.Tensor] = {}

            def sink(g, idx, logits, spine, got=got):
                for j, i in enumerate(idx):
                    got[(g, i)] = logits[j].clone()

            ids = torch.tensor([p.prompt.input_ids for p in group])
            clean = run_group(ad, ids, start, edits, rope, sink, rows_per_pass=rows_per_pass)
            for g in sorted({0, len(group) - 1}):  # the first and last prompt of each batch
                p = group[g]
                ref_clean = _hf(ad, p.prompt.input_ids)
                _close(clean[g], ref_clean)
                for i, (row, edit) in enumerate(zip(rows, edits, strict=True)):
                    with _hooked(ad, row, edit, slice(start, None)):
                        ref = _hf(ad, p.prompt.input_ids)
                    worst = max(worst, _close(got[(g, i)], ref))
                    moved = max(moved, float((ref - ref_clean).abs().max()))
    assert moved > 1e-2, "the edits must change the logits, or this test proves nothing"
    print(f"{ad.arch.model_type}: worst relative error {worst:.2e}, largest logit move {moved:.2f}")
    return worst


def test_engine_equals_hooked_forward_qwen2_llama(tiny_model_dir):
    ad, _, ps, vec = _setup(str(tiny_model_dir))
    _engine_equals_hooked(ad, ps, vec, None)


@pytest.mark.slow
def test_smollm2_sample_equals_hooked_forward(smollm2_dir):
    """The embedded model: every edit kind at boundaries 0, 15 and 29 on the held-out "dog"."""
    ad, _, ps, vec = _setup(str(smollm2_dir))
    _engine_equals_hooked(ad, ps, vec, None, n_words=1)


def test_engine_in_tiny_chunks_equals_hooked_forward(tiny_llama_dir):
    """rows_per_pass 3: one prompt and at most two edits per chunk, the prefix sliced per chunk."""
    ad, _, ps, vec = _setup(str(tiny_llama_dir))
    _engine_equals_hooked(ad, ps, vec, 3)


def test_engine_equals_hooked_forward_further_families(tiny_family_dir):
    ad, _, ps, vec = _setup(str(tiny_family_dir))
    _engine_equals_hooked(ad, ps, vec, None)


# -- vectors, AIE and metrics against hooked HF forwards --------------------------------------


@torch.no_grad()
def _read(ad: Adapter, ids) -> tuple[list[torch.Tensor], torch.Tensor]:
    """HF forward of one prompt: the residual entering every decoder layer and every o_proj input,
    at the last token, read by hooks: [(D,)] x L, (L, H*hd)."""
    got: dict = {}
    hs = []
    for i in range(ad.arch.n_layers):
        hs.append(ad.layers[i].register_forward_pre_hook(
            lambda m, a, kw, i=i: got.__setitem__(("r", i), (a[0] if a else kw["hidden_states"])[0, -1].clone()),
            with_kwargs=True))
        hs.append(ad.o_proj(i).register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(("z", i), a[0][0, -1].clone())))
    try:
        ad.model(input_ids=torch.tensor([list(ids)]), logits_to_keep=1)
    finally:
        for h in hs:
            h.remove()
    L = ad.arch.n_layers
    return [got[("r", i)] for i in range(L)], torch.stack([got[("z", i)] for i in range(L)])


def test_vectors_equal_hooked_forwards(tiny_model_dir):
    ad, _, ps, vec = _setup(str(tiny_model_dir))
    a = ad.arch
    L, H, hd = a.n_layers, a.n_heads, a.head_dim
    train = ps.split.train
    assert vec.built_from == train
    reads = {k: [_read(ad, p.prompt.input_ids) for p in ps.of(k, train)] for k in (Kind.DEMO, Kind.REPEAT, Kind.ECHO)}
    for b in range(L):  # boundaries 0..L-1: the inputs of the decoder layers
        mean = {k: torch.stack([r[0][b] for r in v]).mean(0) for k, v in reads.items()}
        _close(vec.task_vector[Kind.DEMO][b], mean[Kind.DEMO])
        _close(vec.task_vector[Kind.REPEAT][b], mean[Kind.REPEAT])
        _close(vec.steer[b], mean[Kind.REPEAT] - mean[Kind.ECHO])
    z = torch.stack([r[1] for r in reads[Kind.DEMO]]).mean(0).view(L, H, hd)  # (L, H, hd)
    _close(vec.head_mean_z, z)
    # pre-norm families: head h's output = its z slice times its W_O slice, averaged over words
    with torch.no_grad():
        w_o = [ad.o_proj(lay).weight for lay in range(L)]  # (D, H*hd)
        outs = torch.stack([torch.stack([torch.stack([w_o[lay][:, h * hd:(h + 1) * hd] @ zr[lay, h * hd:(h + 1) * hd]
                                                      for h in range(H)]) for lay in range(L)])
                            for _, zr in reads[Kind.DEMO]])  # (N, L, H, D)
    _close(vec.head_mean_out, outs.mean(0))
    aie = torch.randn(L, H, generator=torch.Generator().manual_seed(0))
    fv = function_vectors(vec, aie, (1, 3))
    order = torch.argsort(aie.view(-1), descending=True, stable=True)
    for k in (1, 3):
        top = [int(i) for i in order[:k]]
        assert list(fv.heads[k]) == top
        _close(fv.vector[k], sum(outs.mean(0)[i // H, i % H] for i in top))


def test_aie_equals_hooked_head_mean(tiny_model_dir):
    ad, _, ps, vec = _setup(str(tiny_model_dir))
    from extract.stages.taskvec import aie_table

    a = ad.arch
    L, H, hd = a.n_layers, a.n_heads, a.head_dim
    held = ps.split.held_out
    res = run_rows(ad, ps, held, plan_aie(L, H), vec)
    aie = aie_table(res, L, H)
    z_bar = torch.stack([_read(ad, p.prompt.input_ids)[1] for p in ps.of(Kind.DEMO, ps.split.train)]).mean(0)
    moved = 0.0
    for lay, h in ((0, 0), (L - 1, H - 1), (1, H // 2)):
        cols = slice(h * hd, (h + 1) * hd)

        def pre(mod, args, cols=cols, lay=lay):
            x = args[0].clone()
            x[:, -1, cols] = z_bar[lay, cols]
            return (x,)

        effects = []
        for p in ps.of(Kind.SHUFFLED, held):
            clean = _hf(ad, p.prompt.input_ids)
            _, tid, _ = choose_target(p.prompt, clean)
            handle = ad.o_proj(lay).register_forward_pre_hook(pre)
            try:
                patched = _hf(ad, p.prompt.input_ids)
            finally:
                handle.remove()
            effects.append(float(torch.softmax(patched, -1)[tid] - torch.softmax(clean, -1)[tid]))
            moved = max(moved, float((patched - clean).abs().max()))
        ref = sum(effects) / len(effects)
        assert abs(float(aie[lay, h]) - ref) <= TOL, (lay, h, float(aie[lay, h]), ref)
    # a random model's target probabilities are tiny: the logits must move, or this proves nothing
    assert moved > 1e-2


def test_metrics_and_invariants(tiny_model_dir):
    ad, _, ps, vec = _setup(str(tiny_model_dir))
    L = ad.arch.n_layers
    held = ps.split.held_out
    fv = function_vectors(vec, torch.ones(L, ad.arch.n_heads))
    rows = [r for rs in _sample_rows(L, ad.arch.n_heads).values() for r in rs if r.method != Method.HEAD_MEAN]
    rows += [Row(Method.SELF_PATCH, Kind.ECHO, b, Where.FROM_VERB) for b in range(L)]
    rows += [Row(Method.STEER, Kind.REPEAT, b, coef=0.0) for b in range(L)]
    res = run_rows(ad, ps, held, rows, vec, fv, clean_kinds=(Kind.DEMO,))
    for w, r in res.items():
        checks = {c.invariant: c for c in r.checks.values()}
        # the edited row's input is the spine's bit for bit; the BLAS may still round a batch row
        # differently from another (seen: 4e-7 relative on the tiny Qwen2), hence 1e-6, not 0
        assert checks["taskvec_self_patch_is_clean"].rel_err <= 1e-6
        assert checks["taskvec_c0_is_clean"].rel_err <= 1e-6
        assert checks["taskvec_clean_is_model"].rel_err <= TOL
        assert set(r.clean) == {Kind.DEMO, Kind.ZERO_SHOT, Kind.NEUTRAL, Kind.REPEAT, Kind.ECHO}
        arrays = r.arrays()
        assert all(len(v) == len(rows) for f, v in arrays.items() if f.axes == ("Q",))
        for q, row in enumerate(rows):
            p = ps.get(row.kind, w)
            clean = _hf(ad, p.prompt.input_ids)
            start = p.verb_pos if row.where == Where.FROM_VERB else p.n_tokens - 1
            with _hooked(ad, row, edit_for(row, vec, fv), slice(start, None)):
                logits = _hf(ad, p.prompt.input_ids)
            _, tid, _ = choose_target(p.prompt, clean)
            prob = torch.softmax(logits.double(), -1)
            p0 = torch.softmax(clean.double(), -1)
            assert abs(float(r.target_prob[q]) - float(prob[tid])) <= TOL
            assert abs(float(r.kl[q]) - float((p0 * (p0.log() - prob.log())).sum())) <= TOL
            top2 = logits.topk(2).values
            if float(top2[0] - top2[1]) > 1e-3:  # a near-tie may flip under float rounding
                assert int(r.top1_id[q]) == int(logits.argmax())
                assert bool(r.echo_correct[q]) == (int(logits.argmax()) in {c[1] for c in p.prompt.candidates})
            gap = (logits - logits[tid]).abs()
            if float(gap[gap > 0].min()) > 1e-3:
                assert int(r.target_rank[q]) == int((logits > logits[tid]).sum())


# -- prompts and the split ----------------------------------------------------------------


def test_prompt_sets_and_split(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    ps = build_set(tok, WORDS, n_demos=N_DEMOS, chat=False)
    assert ps.split.train == ("cat", "house", "tree", "sun")
    assert ps.split.held_out == ("dog", "xylophone", "book", "moon")
    for w in WORDS:
        demos = ps.split.demos(w, N_DEMOS)
        assert set(demos) <= set(ps.split.train) and w not in demos and len(set(demos)) == N_DEMOS
    # "dog" (index 1): the train words after it, cyclically: house, tree, sun
    assert ps.get(Kind.DEMO, "dog").prompt.text == "house -> house\ntree -> tree\nsun -> sun\ndog ->"
    assert ps.get(Kind.SHUFFLED, "dog").prompt.text == "house -> tree\ntree -> sun\nsun -> house\ndog ->"
    # "sun" (index 6, train): cat, house, tree -- itself skipped
    assert ps.get(Kind.DEMO, "sun").prompt.text == "cat -> cat\nhouse -> house\ntree -> tree\nsun ->"
    assert ps.get(Kind.ZERO_SHOT, "moon").prompt.text == "moon ->"
    assert ps.get(Kind.NEUTRAL, "moon").prompt.text == "the following word: moon"
    for kind, verb in ((Kind.REPEAT, "repeat"), (Kind.ECHO, "echo")):
        p = ps.get(kind, "book")
        assert p.prompt.token_text[p.verb_pos].strip() == verb
    chat = build_set(tok, WORDS, n_demos=N_DEMOS)
    p = chat.get(Kind.ZERO_SHOT, "moon")
    assert p.prompt.text.endswith(tok.apply_chat_template(
        [{"role": "user", "content": "moon ->"}], tokenize=False, add_generation_prompt=True)[-40:])
    assert "user\nmoon ->" in p.prompt.text
    rec = chat.record()
    assert json.loads(json.dumps(rec)) == rec == build_set(tok, WORDS, n_demos=N_DEMOS).record()


def test_vectors_are_never_evaluated_on_their_words(tiny_llama_dir):
    ad, _, ps, vec = _setup(str(tiny_llama_dir))
    with pytest.raises(AssertionError, match="must not be evaluated"):
        run_rows(ad, ps, ("dog", "cat"), [Row(Method.SELF_PATCH, Kind.ZERO_SHOT, 0)], vec)


def test_results_are_keyed_by_the_schema_fields(tiny_llama_dir):
    from extract.stages.taskvec import vector_arrays
    from store.taskvec_schema import TQ, TV

    ad, _, ps, vec = _setup(str(tiny_llama_dir))
    L, H = ad.arch.n_layers, ad.arch.n_heads
    fv = function_vectors(vec, torch.ones(L, H))
    rows = [Row(Method.SELF_PATCH, Kind.ZERO_SHOT, 0), Row(Method.STEER, Kind.ECHO, 1, coef=0.0)]
    (res,) = run_rows(ad, ps, ps.split.held_out[:1], rows, vec, fv).values()
    arrays = res.arrays()
    fields = [f for f in vars(TQ).values() if hasattr(f, "axes")]
    assert set(arrays) == set(fields)
    for f, v in arrays.items():
        if f.axes == ("Q",):
            assert len(v) == len(rows), f.name
    assert [r[0] for r in arrays[TQ.VALIDATION]] == ["taskvec_clean_is_model", "taskvec_self_patch_is_clean",
                                                     "taskvec_c0_is_clean"]
    assert all(r[4] for r in arrays[TQ.VALIDATION])
    vecs = vector_arrays(ps, vec, fv)
    assert set(vecs) == {f for f in vars(TV).values() if hasattr(f, "axes")}
    assert [r[0] for r in vecs.pop(TV.VALIDATION)] == ["taskvec_capture_is_model"]
    sizes = {"W": len(WORDS), "S": 2, "B": L + 1, "D": ad.arch.d_model, "L": L, "H": H, "hd": ad.arch.head_dim,
             "KF": 3, "KMAX": min(20, L * H), "CV": 6}
    for f, v in vecs.items():
        assert v.shape == tuple(sizes[x] for x in f.axes), f.name


def test_run_study_end_to_end(tiny_llama_dir):
    """Every phase on the tiny Llama: summaries equal their definitions over the word results."""
    from extract.stages.taskvec import run_study

    ad, tok, _, _ = _setup(str(tiny_llama_dir))
    L, H = ad.arch.n_layers, ad.arch.n_heads
    r = run_study(ad, tok, WORDS, n_demos=N_DEMOS, system_prompt=SYSTEM, ks=(1, 2), coefs=(0.0, 1.0))
    held = r.prompts.split.held_out
    assert set(r.rows) == set(r.aie_rows) == set(held)
    deltas = torch.zeros(L, H, dtype=torch.float64)
    for w in held:
        a = r.aie_rows[w]
        base = a.clean[Kind.SHUFFLED][1]
        for q, row in enumerate(a.rows):
            deltas[row.layer, row.head] += (float(a.target_prob[q]) - base) / len(held)
    _close(r.fv.aie, deltas, 1e-6)
    assert r.fv.heads[2][0] == int(torch.argmax(deltas.view(-1)))
    for acc in r.accuracy:
        q = r.rows[held[0]].rows.index(acc.row)
        assert acc.accuracy == pytest.approx(sum(bool(r.rows[w].echo_correct[q]) for w in held) / len(held))
    assert set(r.baselines) == {Kind.DEMO, Kind.ZERO_SHOT, Kind.SHUFFLED, Kind.NEUTRAL, Kind.REPEAT, Kind.ECHO}
    assert r.cosine.shape == (6, L + 1)
    for w in held:
        assert all(c.rel_err <= TOL for c in r.rows[w].checks.values())
