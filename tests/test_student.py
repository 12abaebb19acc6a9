"""Building the student: derive from the teacher (layers / width), config JSON, checkpoint, vocabulary check."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from asserts import assert_close
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ddk_offline.distillation.student import (
    VocabMismatchError,
    check_vocab,
    derive_student,
    load_student,
    parse_derive_spec,
    select_layers,
)

VOCAB = 97


def _llama(layers=5, hidden=48, heads=4, kv_heads=2, intermediate=64, tie=False, seed=0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _forward(model, vocab=VOCAB, batch=2, length=7):
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _pruned_by_hand(layers: int, keep: list[int]):
    """The tiny Llama with only the ``keep`` layers left in its module list (what a layers-only derive must equal)."""
    pruned = _llama(layers=layers)
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[i] for i in keep])
    for j, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = j
    pruned.config.num_hidden_layers = len(keep)
    return pruned


def test_select_layers():
    assert select_layers(5, 3) == [0, 2, 4]
    assert select_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert select_layers(4, 4) == [0, 1, 2, 3]
    assert select_layers(4, 2) == [0, 3]
    assert select_layers(4, 1) == [0]


def test_parse_derive_spec():
    assert parse_derive_spec(" layers=8, hidden=384 ,kv_heads=2") == {"layers": 8, "hidden": 384, "kv_heads": 2}
    assert parse_derive_spec("drop=12-19") == {"drop": (12, 19)}
    assert parse_derive_spec("drop=3,hidden=24") == {"drop": (3, 3), "hidden": 24}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty"),
        ("depth=3", "bad item"),
        ("layers", "bad item"),
        ("layers=0", "positive integer"),
        ("layers=2.5", "positive integer"),
        ("layers=2,layers=3", "given twice"),
        ("layers=9", "exceeds the teacher's 5"),
        ("hidden=40", "not an integer; pass heads="),  # 4 * 40 / 48 heads
        ("heads=3", "not a multiple of the teacher's group size 2"),
        ("heads=3,kv_heads=2", "multiple of kv_heads"),
        ("drop=3-1", "must be A-B with 0 <= A <= B"),
        ("drop=a-2", "must be A-B"),
        ("drop=1-2,layers=2", "not both"),
        ("drop=1-5", "the teacher has layers 0..4"),
        ("drop=0-4", "removes all 5 teacher layers"),
    ],
)
def test_bad_derive_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        derive_student(_llama(), spec)


def test_derive_fewer_layers_copies_kept_layers_exactly():
    teacher = _llama(layers=5)
    student = derive_student(teacher, "layers=3")
    assert student.config.num_hidden_layers == 3 and student.config.ddk_derived["layers"] == [0, 2, 4]
    assert student.config.ddk_derived["random_init"] == []
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([0, 2, 4]):
        for suffix in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight"):
            assert torch.equal(s_sd[f"model.layers.{j}.{suffix}"], t_sd[f"model.layers.{i}.{suffix}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_sd[name], t_sd[name])
    assert _forward(student).shape == (2, 7, VOCAB)

    # The same layers kept in full width give the same network as the teacher with layers 1 and 3 removed.
    assert_close(_forward(student), _forward(_pruned_by_hand(5, [0, 2, 4])), rtol=1e-5, atol=1e-5, name="logits")


def test_derive_drop_block_copies_the_other_layers_in_order():
    teacher = _llama(layers=5)
    student = derive_student(teacher, "drop=1-2")
    assert student.config.num_hidden_layers == 3 and student.config.ddk_derived["layers"] == [0, 3, 4]
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([0, 3, 4]):
        assert torch.equal(
            s_sd[f"model.layers.{j}.self_attn.o_proj.weight"], t_sd[f"model.layers.{i}.self_attn.o_proj.weight"]
        )
    # The same network as the teacher with layers 1 and 2 removed by hand.
    assert_close(_forward(student), _forward(_pruned_by_hand(5, [0, 3, 4])), rtol=1e-5, atol=1e-5, name="logits")


def test_derive_from_teacher_dir_and_save_round_trip(teacher_dir, tmp_path):
    student = load_student(derive="layers=1", teacher=teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    student.save_pretrained(tmp_path / "s")
    again = load_student(pretrained=tmp_path / "s")
    assert again.config.num_hidden_layers == 1 and again.config.ddk_derived["spec"] == "layers=1"
    v = teacher.config.vocab_size
    assert_close(_forward(again, vocab=v), _forward(student, vocab=v), rtol=0, atol=0, name="reloaded logits")


def test_derive_narrower_slices_and_runs():
    teacher = _llama(layers=4, hidden=48, heads=4, kv_heads=2, intermediate=64)  # head_dim 12, group size 2
    student = derive_student(teacher, "layers=2,hidden=24,intermediate=32")
    cfg = student.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (24, 2, 1, 12)
    assert cfg.intermediate_size == 32 and cfg.ddk_derived["random_init"] == []
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"][:, :24])
    assert torch.equal(
        s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight"][:24, :24]
    )
    assert torch.equal(
        s["model.layers.1.self_attn.k_proj.weight"], t["model.layers.3.self_attn.k_proj.weight"][:12, :24]
    )
    assert torch.equal(s["model.layers.0.mlp.down_proj.weight"], t["model.layers.0.mlp.down_proj.weight"][:24, :32])
    logits = _forward(student)
    assert logits.shape == (2, 7, VOCAB) and torch.isfinite(logits).all()
    # It trains: one backward pass gives finite gradients everywhere.
    student.train()(
        input_ids=torch.zeros(1, 5, dtype=torch.long), labels=torch.zeros(1, 5, dtype=torch.long)
    ).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_derive_keeps_tied_embeddings_tied():
    teacher = _llama(layers=2, tie=True)
    student = derive_student(teacher, "hidden=24,heads=2,kv_heads=1")
    assert student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, :24])
    assert _forward(student).shape == (2, 7, VOCAB)


def test_config_json_gives_random_init_student(tmp_path):
    cfg = _llama(layers=2, hidden=32, heads=2, kv_heads=2).config
    path = tmp_path / "student.json"
    path.write_text(json.dumps(cfg.to_dict()))
    a = load_student(config=path, seed=3)
    b = load_student(config=path, seed=3)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 32
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)  # seeded
    assert not torch.equal(
        a.model.layers[0].mlp.up_proj.weight,
        _llama(layers=2, hidden=32, heads=2, kv_heads=2).model.layers[0].mlp.up_proj.weight,
    )
    assert _forward(a).shape == (2, 7, VOCAB)


def test_load_student_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        load_student()
    with pytest.raises(ValueError, match="exactly one"):
        load_student(config="a.json", derive="layers=1")
    with pytest.raises(ValueError, match="needs teacher="):
        load_student(derive="layers=1")
    with pytest.raises(FileNotFoundError, match="student config"):
        load_student(config=tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_student(pretrained=tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        load_student(pretrained=tmp_path / "model.gguf")


def test_check_vocab(teacher_dir):
    student = load_student(derive="layers=1", teacher=teacher_dir)
    n = student.config.vocab_size
    check_vocab(student, n, teacher_dir, teacher_vocab_size=n)
    check_vocab(student, n - 10, teacher_dir, teacher_vocab_size=n)  # padded embedding matrix: fine
    small = _llama(layers=1)  # vocab 97, not the teacher's
    with pytest.raises(VocabMismatchError, match=rf"{teacher_dir}.*97 embedding rows.*vocab_size={n}"):
        check_vocab(small, n, teacher_dir, teacher_vocab_size=n)
    with pytest.raises(VocabMismatchError, match="fewer than the dump tokenizer's 200 tokens"):
        check_vocab(small, 200, "dump/")
    with pytest.raises(VocabMismatchError, match="derive the student from the teacher"):
        check_vocab(student, n, "dump/", teacher_vocab_size=n + 64)


def test_derive_explicit_head_dim_layer_types_and_fused_refusal():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

    # Qwen3: head_dim is its own field (heads * head_dim != hidden) and layer_types is a per-layer list.
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    cfg.layer_types = ["sliding_attention", "full_attention", "full_attention", "full_attention"]
    cfg.sliding_window = 4
    student = derive_student(Qwen3ForCausalLM(cfg), "layers=2,hidden=16")
    c = student.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 16)
    assert c.layer_types == ["sliding_attention", "full_attention"]
    assert _forward(student).shape == (2, 7, VOCAB)

    # GPT-2 fuses q, k, v in c_attn: layers-only derives work, width changes are refused.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    assert derive_student(gpt2, "layers=2").config.n_layer == 2
    with pytest.raises(ValueError, match=r"fused projections \['c_attn'\]"):
        derive_student(gpt2, "hidden=16,heads=2")


def test_students_become_fp32_without_model_float(monkeypatch):
    """transformers refuses ``.float()`` on a model loaded from a GGUF (it counts as quantised): not used."""
    import torch

    from ddk_offline.distillation.setup import _fp32

    model = tiny.make_model(64, hidden=16, layers=1, heads=2).to(torch.bfloat16)

    def refuse():
        raise ValueError("`.float()` is not supported for quantized model")

    monkeypatch.setattr(model, "float", refuse)
    out = _fp32(model)
    assert out is model and {p.dtype for p in model.parameters()} == {torch.float32}
