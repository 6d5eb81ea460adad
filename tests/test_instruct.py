"""Instruction data: prompt/completion pairs and chat conversations (rendered with the tokenizer's
chat template, as transformers renders it), the loss on the answer's tokens only, the same loss
and gradients on 1 and 2 processes, batches that survive a resume, bad lines named file:line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import moedsl
from moedsl.cli import main
from moedsl.errors import UserError
from moedsl.runtime.chat_template import find_chat_template
from moedsl.runtime.data import make_source, source_problems
from moedsl.runtime.instruct import Instructions
from moedsl.runtime.step import task_loss

tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CORPUS = ["the capital of france is paris. hello world, how are you? fine thanks, and you?",
          "a quick brown fox jumps over the lazy dog; one two three four five six seven."] * 20

# real-world templates, verbatim from their tokenizer_config.json
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
          "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if "
          "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # Qwen2-7B-Instruct
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")  # Llama-2-7b-chat-hf
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
           "message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
           "user and assistant roles are supported!') }}{% endif %}{% endfor %}")  # Mistral-7B-Instruct-v0.1
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
          "{% endfor %}")  # zephyr-7b-beta: trim_blocks and lstrip_blocks at work
GENERATION = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['role'] == "
              "'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
              "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt "
              "%}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # ChatML with transformers' {% generation %} blocks
# transformers' tojson does not escape HTML ('<b>' stays), jinja2's own would
TOJSON = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "mistral": MISTRAL, "zephyr": ZEPHYR, "generation": GENERATION,
             "tojson": TOJSON, "named": {"default": CHATML, "tool_use": ZEPHYR},
             "listed": [{"name": "rag", "template": CHATML}, {"name": "default", "template": ZEPHYR}]}
CONVERSATIONS = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}],
    [{"role": "system", "content": "you are <b>fine</b> & quick"}, {"role": "user", "content": "capital of france?"},
     {"role": "assistant", "content": " paris. "}, {"role": "user", "content": "and you, café? ☕"},
     {"role": "assistant", "content": "fine thanks ☕ é"}],  # offsets count characters, not bytes
    [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three four"},
     {"role": "user", "content": "five"}],
    [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you?"}],  # roles out of order
]


def tokenizer_folder(folder: Path, template=None, bos=True, **config) -> Path:
    """A byte-level BPE tokenizer.json (Llama-like: bos before a sequence when ``bos``) and its
    tokenizer_config.json with ``template``; returns the folder."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
           **config}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def spec_with_tokenizer(tmp_path: Path, vocab: int = 320):
    """A tiny token spec saved beside ``tmp_path/tok/tokenizer.json``, which is then its model's
    tokenizer (as an import's spec.yaml has the import's)."""
    data = yaml.safe_load((ROOT / "specs" / "mixtral.yaml").read_text())
    data["model"]["vocab_size"] = vocab
    path = tmp_path / "tok" / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return moedsl.load_spec(path)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


# ----------------------------------------------------------------------------- the chat template

@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_renders_as_transformers_apply_chat_template(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path / "tok", TEMPLATES[name])
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = find_chat_template(folder / "tokenizer.json")
    compared = 0
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            try:
                want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            except Exception as e:  # noqa: BLE001 - the template's raise_exception: ours must refuse too
                with pytest.raises(UserError, match="refused the conversation"):
                    ours.render(messages, add_generation_prompt=prompt)
                assert "alternate" in str(e) or "roles" in str(e)
                continue
            assert ours.render(messages, add_generation_prompt=prompt) == want
            compared += 1
    assert compared >= 4


def test_generation_blocks_give_transformers_assistant_mask(tmp_path):
    """A template with {% generation %} blocks: the tokens in the loss are the tokens transformers'
    return_assistant_tokens_mask marks."""
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path / "tok", GENERATION)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    spec = spec_with_tokenizer(tmp_path)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS[:3]] * 2)
    src = Instructions(data, spec, seed=0)
    for ids, counts in src.examples["train"] + src.examples["eval"]:
        text = decode(src.codec.tok, ids)
        messages = next(m for m in CONVERSATIONS if ref.apply_chat_template(m, tokenize=False) == text)
        out = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids.tolist()
        assert out["assistant_masks"] == counts.astype(int).tolist()


def test_a_chat_template_jinja_file_comes_before_the_configs_as_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path / "tok", CHATML)
    (folder / "chat_template.jinja").write_text(ZEPHYR)
    want = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert want.startswith("<|system|>")
    assert find_chat_template(folder / "tokenizer.json").render(CONVERSATIONS[1]) == want


def test_a_dict_of_templates_without_default_is_one_line(tmp_path):
    folder = tokenizer_folder(tmp_path / "tok", {"tool_use": CHATML, "rag": ZEPHYR})
    with pytest.raises(UserError, match=r"chat_template: several templates \(rag, tool_use\) and no 'default'"):
        find_chat_template(folder / "tokenizer.json")


# ----------------------------------------------------------------------------- the loss mask

def _masked_text(src, split="train", seq=64):
    """(row text, masked targets' text) of every example of ``split``, one row each."""
    n = src.size(split)
    out = []
    for s in range(n):
        b = src.batch(s, 1, seq, split=split)
        ids = torch.cat([b.inputs[0, :1], b.targets[0]])
        masked = b.targets[0][b.loss_mask[0]]
        out.append((decode(src.codec.tok, ids[ids != src.codec.pad]), decode(src.codec.tok, masked)))
    return out


def test_loss_mask_covers_exactly_the_completion_and_its_eos(tmp_path):
    tokenizer_folder(tmp_path / "tok")
    pairs = [{"prompt": f"capital of france? {i}", "completion": f" paris. {'hello ' * (i % 3)}world"}
             for i in range(12)]
    src = Instructions(write_jsonl(tmp_path / "pc.jsonl", pairs), spec_with_tokenizer(tmp_path), seed=0)
    assert src.codec.prefix == [0]  # the tokenizer's bos, as its post-processor puts it
    seen = set()
    for split in ("train", "eval"):
        for row, masked in _masked_text(src, split):
            pair = next(p for p in pairs if row == "<s>" + p["prompt"] + p["completion"] + "</s>")
            assert masked == pair["completion"] + "</s>"
            seen.add(pair["prompt"])
    assert len(seen) == len(pairs)


@pytest.mark.parametrize("template,answer", [
    (CHATML, lambda c: c + "<|im_end|>\n"),  # what follows '<|im_start|>assistant\n': the end of turn included
    (LLAMA2, lambda c: " " + c.strip() + " </s>"),
    (ZEPHYR, lambda c: c + "</s>\n"),  # the newline after a {{ }} tag stays: the prompt is '<|assistant|>\n'
    (GENERATION, lambda c: c + "<|im_end|>"),  # the template's own {% generation %} blocks
])
def test_loss_mask_covers_exactly_the_assistant_messages(tmp_path, template, answer):
    tokenizer_folder(tmp_path / "tok", template)
    convs = [CONVERSATIONS[0], CONVERSATIONS[1]] * 3
    src = Instructions(write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs]),
                       spec_with_tokenizer(tmp_path), seed=0)
    for split in ("train", "eval"):
        for row, masked in _masked_text(src, split, seq=128):
            messages = next(m for m in convs if row == src.codec.template.render(m))
            assert masked == "".join(answer(m["content"]) for m in messages if m["role"] == "assistant")


def test_rows_are_cut_at_seq_plus_one_and_padded_outside_the_loss(tmp_path):
    tokenizer_folder(tmp_path / "tok")
    pairs = [{"prompt": "hello", "completion": " world"}, {"prompt": "one two three four five six seven " * 3,
                                                          "completion": " the lazy dog"}] * 4
    src = Instructions(write_jsonl(tmp_path / "pc.jsonl", pairs), spec_with_tokenizer(tmp_path), seed=0)
    seq = 12
    lengths = sorted({int(ids.size) for ids, _ in src.examples["train"]})
    assert lengths[0] < seq + 1 < lengths[-1]
    b = src.batch(0, src.size("train"), seq)
    assert b.inputs.shape == b.targets.shape == b.loss_mask.shape == (src.size("train"), seq)
    for r in range(b.inputs.shape[0]):
        row = torch.cat([b.inputs[r, :1], b.targets[r]])
        pad = row == src.codec.pad
        if pad.any():  # a short example: padded after its eos, none of the padding in the loss
            n = int((~pad).sum())
            assert pad[n:].all() and not pad[:n].any() and int(row[n - 1]) == src.codec.eos
            assert not b.loss_mask[r, n - 1:].any() and b.loss_mask[r, :n - 1].any()
        else:  # a long one: its first seq + 1 tokens, the prompt's alone (the completion is cut away)
            assert decode(src.codec.tok, row).startswith("<s>one two three")
            assert not b.loss_mask[r].any()
    note = src.notes(seq)[1]
    assert note.startswith("pc.jsonl: 4 of 8 examples truncated to seq+1 = 13 tokens")
    assert "(4 of them keep no token of the answer)" in note
    assert src.notes(64)[1] == "pc.jsonl: 0 of 8 examples truncated to seq+1 = 65 tokens"


def test_task_loss_with_a_mask_is_the_mean_cross_entropy_of_the_marked_targets():
    spec = moedsl.load_spec(ROOT / "specs" / "mixtral.yaml")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    out = type("Out", (), {"output": logits})()
    logp = logits.log_softmax(-1)
    by_hand = -sum(float(logp[b, t, targets[b, t]]) for b in range(2) for t in range(5) if mask[b, t]) / 4
    assert float(task_loss(spec, out, targets, mask)) == pytest.approx(by_hand, rel=1e-6)
    # a count from elsewhere (the step's global one) divides the same sum
    assert float(task_loss(spec, out, targets, mask, torch.tensor(8.0))) == pytest.approx(by_hand / 2, rel=1e-6)
    # no mask: the mean over every target, as before
    assert torch.equal(task_loss(spec, out, targets), F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def _masked_step_worker(rank: int, world: int, spec_data: dict, inputs, targets, mask):
    """One training step (``TrainStep.for_run``, a run's) of a masked global batch on ``world``
    ranks and in one process: (loss over ranks, max |Δ grad|, masked targets on this rank)."""
    import torch.distributed as dist

    from moedsl.api import build_model, load_spec
    from moedsl.runtime.equivalence import _excess  # noqa: F401 - the equivalence check's helpers are its own
    from moedsl.runtime.step import TrainStep
    from moedsl.runtime.train import RunOptions

    torch.set_num_threads(1)
    spec = load_spec(spec_data)

    def step(model, rows, r, w):
        s = TrainStep.for_run(model, spec, RunOptions.from_spec(spec), r, w, amp=None, capturable=False)
        s.lr.fill_(1e-3)
        try:
            return s(inputs[rows], targets[rows], mask[rows])
        finally:
            s.sync.close()

    ref_model = build_model(spec, seed=0, dtype=torch.float32)
    ref = step(ref_model, slice(None), 0, 1)
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    model = build_model(spec, seed=0, rank=rank, world_size=world, dtype=torch.float32)
    share = inputs.shape[0] // world
    rows = slice(rank * share, (rank + 1) * share)
    out = step(model, rows, rank, world)
    loss = out.loss.clone()
    dist.all_reduce(loss)
    buffers = dict(model.named_buffers())
    worst = 0.0
    for name, p in model.named_parameters():
        r = ref_grads[name]
        if ".experts." in name:
            r = r[buffers[name.rsplit(".", 1)[0] + ".expert_ids"]]
        worst = max(worst, float((p.grad - r).abs().max()))
    return float(loss) / world, float(ref.loss), worst, int(mask[rows].sum())


def test_masked_loss_and_gradients_on_two_processes_equal_one_process():
    """The ranks' masked targets differ (6 against 25): each rank divides by the step's count, not
    its own, so the loss and every gradient are the single process's."""
    from moedsl.runtime.spawn import spawn

    spec = yaml.safe_load((ROOT / "specs" / "mixtral.yaml").read_text())
    g = torch.Generator().manual_seed(3)
    inputs = torch.randint(0, 256, (4, 16), generator=g)
    targets = torch.randint(0, 256, (4, 16), generator=g)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[0, 10:13] = mask[1, 2:5] = True  # rank 0: 6 targets
    mask[2, 3:] = mask[3, 4:16] = True  # rank 1: 13 + 12
    results = spawn(_masked_step_worker, 2, spec, inputs, targets, mask)
    assert [r[3] for r in results] == [6, 25]
    for loss, ref_loss, worst, _ in results:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert worst < 2e-6


def test_a_masked_step_reads_nothing_back_to_the_host():
    """The count that divides the masked loss stays a device tensor: the step CUDA graphs capture
    (a static layout, run here on a CPU) makes no host read with a loss mask either."""
    from test_trainer import HostSyncs, trainer

    from moedsl.runtime.data import Batch

    t = trainer("switch", layout="static")
    b = t.source.batch(0, 4, 16)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[1:, 5:] = True
    logits = []
    hook = t.model.register_forward_hook(lambda _m, _a, out: logits.append(out.output.detach()))
    with HostSyncs() as probe:
        out = t.step(Batch(b.inputs, b.targets, loss_mask=mask), 1e-3)
    hook.remove()
    assert probe.seen == []
    each = F.cross_entropy(logits[0].flatten(0, 1), b.targets.flatten(), reduction="none")
    assert float(out.loss) == pytest.approx(float(each[mask.flatten()].mean()), rel=1e-5)  # the answers' tokens only


# ----------------------------------------------------------------------------- batches

def test_batches_are_a_function_of_seed_step_and_row_across_a_resume_and_processes(tmp_path):
    tokenizer_folder(tmp_path / "tok")
    pairs = [{"prompt": f"hello {i}", "completion": f" world {i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "pc.jsonl", pairs)
    spec = spec_with_tokenizer(tmp_path)
    first = Instructions(data, spec, seed=5)
    n = first.size("train")
    assert 1 <= first.size("eval") <= 6 and n + first.size("eval") == 40
    # an epoch is a permutation: every training example once in n rows
    epoch = torch.cat([first.batch(s, 4, 16).inputs for s in range(n // 4)])
    assert len({tuple(r.tolist()) for r in epoch}) == n // 4 * 4
    resumed = Instructions(data, spec, seed=5)  # a fresh source, as a resumed run opens it, at step 7
    for step in (7, 8, 30):
        one = first.batch(step, 4, 16)
        assert torch.equal(resumed.batch(step, 4, 16).inputs, one.inputs)
        halves = [resumed.batch(step, 4, 16, rank, 2) for rank in (0, 1)]
        for field in ("inputs", "targets", "loss_mask"):
            assert torch.equal(torch.cat([getattr(h, field) for h in halves]), getattr(one, field))
    assert not torch.equal(Instructions(data, spec, seed=6).batch(0, 4, 16).inputs, first.batch(0, 4, 16).inputs)


def test_a_run_on_instruction_data_resumed_from_a_checkpoint_repeats_the_uninterrupted_one(tmp_path):
    import shutil

    tokenizer_folder(tmp_path / "tok")
    spec_with_tokenizer(tmp_path)  # tok/spec.yaml, beside its tokenizer
    pairs = [{"prompt": f"capital of france? {i}", "completion": " paris." + " fine thanks" * (i % 3)}
             for i in range(24)]
    data = write_jsonl(tmp_path / "pc.jsonl", pairs)
    out = tmp_path / "run"
    run = ["run", str(tmp_path / "tok" / "spec.yaml"), "--data", str(data), "--steps", "4", "--batch", "4", "--seq",
           "32", "--checkpoint-every", "2", "--eval-batches", "1", "--out", str(out), "--no-progress",
           "--ignore-memory-check"]
    assert main(run) == 0
    whole = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    assert main(run + ["--resume"]) == 0  # from step 2: steps 3 and 4 again
    assert [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()] == whole


@pytest.mark.parametrize("lines,where,why", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b"', ], 2, "not JSON"),
    (['{"prompt": "a", "completion": "b"}', '', '{"prompt": "a"}'], 3, "no 'completion'"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": 3}'], 2, "'completion' is a JSON number"),
    (['{"prompt": "a", "completion": "b"}', '["a", "b"]'], 2, "a JSON array, not an object"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
      '{"messages": [{"role": "user"}]}'], 2, "messages[0] has no 'content'"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
      '{"messages": [{"role": "user", "content": "a"}]}'], 2, "no assistant message"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
      '{"messages": {"role": "user", "content": "a"}}'], 2, "'messages' is a JSON object, not a list"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, capsys, lines, where, why):
    tokenizer_folder(tmp_path / "tok", CHATML)
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    spec = spec_with_tokenizer(tmp_path)
    found = source_problems(spec, str(data), 16)
    assert len(found) == 1 and found[0].startswith(f"{data}:{where}: ") and why in found[0], found
    with pytest.raises(UserError, match=f"{data}:{where}: "):
        make_source(spec, str(data), 0)


def test_refusals_before_any_model_is_built(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}] * 3)
    spec = moedsl.load_spec(ROOT / "specs" / "mixtral.yaml")  # byte-level: no tokenizer
    found = source_problems(spec, str(data), 16)
    assert len(found) == 1 and "instruction data (messages) is tokenized with the model's tokenizer" in found[0]
    tokenizer_folder(tmp_path / "tok")  # a tokenizer, but no chat template
    found = source_problems(spec_with_tokenizer(tmp_path), str(data), 16)
    assert len(found) == 1 and "has none (tokenizer_config.json chat_template" in found[0]
    with pytest.raises(UserError, match="has none"):  # Python's make_source, without the preflight
        make_source(spec_with_tokenizer(tmp_path), str(data), 0)
    tokenizer_folder(tmp_path / "tok", MISTRAL)  # a template that refuses the second record's roles
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[3]}])
    found = source_problems(spec_with_tokenizer(tmp_path), str(data), 16)
    assert len(found) == 1 and found[0].startswith(f"{data}:2: ") and "roles must alternate" in found[0]
    found = source_problems(spec_with_tokenizer(tmp_path, vocab=256), str(data), 16)
    assert len(found) == 1 and "more than model.vocab_size 256" in found[0]
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "completion": "b"}])
    assert source_problems(spec_with_tokenizer(tmp_path), str(one), 16) == [
        f"--data {one}: 1 record(s): at least 2 (one is held out)"]
    # a JSONL of text is a plain corpus, not instruction data
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello world"}] * 100)
    assert not any("instruction" in p for p in source_problems(spec, str(text), 16))


def test_run_refuses_chat_data_for_a_model_without_a_tokenizer_in_one_line_with_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}] * 3)
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "specs" / "mixtral.yaml"), "--data", str(data), "--out", str(out), "--steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "instruction data (messages) is tokenized with the model's tokenizer" in err
    assert not out.exists()  # refused before anything was built or written


# ----------------------------------------------------------------------------- end to end

def test_run_init_on_prompt_completion_jsonl_trains_the_loss_down(tmp_path):
    """``moedsl run`` of a tiny import (its tokenizer beside the weights) with --init on instruction
    data: the first lines say how many examples were cut, and the loss falls."""
    pytest.importorskip("transformers")
    from hf_helpers import import_tiny_mixtral

    tokenizer_folder(import_tiny_mixtral(tmp_path, vocab_size=320))
    pairs = [{"prompt": f"capital of france? {'one two ' * (i % 3)}", "completion": " paris. fine thanks"}
             for i in range(30)] + [{"prompt": "the lazy dog " * 12, "completion": " jumps"}]
    data = write_jsonl(tmp_path / "pc.jsonl", pairs)
    r = subprocess.run([sys.executable, "-m", "moedsl", "run", str(tmp_path / "imp" / "spec.yaml"), "--init",
                        str(tmp_path / "imp"), "--data", str(data), "--steps", "12", "--batch", "4", "--seq", "32",
                        "--lr", "1e-2", "--warmup", "1", "--eval-every", "12", "--eval-batches", "1", "--no-progress",
                        "--out", str(tmp_path / "run"), "--ignore-memory-check"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    said = " ".join((r.stdout + r.stderr).split())  # as printed, wrapped to the terminal's width or not
    # the lazy dog's prompt alone is longer than a row
    assert "pc.jsonl: 1 of 31 examples truncated to seq+1 = 33 tokens (1 of them keep no token of the answer)" in said
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    assert rows[-1]["eval_loss"] < 0.7 * sum(losses[:3]) / 3  # the held-out answers, learnt too
    # `moedsl eval` of the run: the same held-out answers through the run's tokenizer, the same loss
    r = subprocess.run([sys.executable, "-m", "moedsl", "eval", str(tmp_path / "run"), "--json"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-6)


def test_a_run_on_instruction_data_on_two_processes_follows_one_process(tmp_path):
    """Three steps of `moedsl run --init` on chat data with 1 and 2 processes: the same losses, so
    the same batches, masks, global normalisation and updates (rows of a few answer tokens beside
    rows of many: the ranks' masked counts differ)."""
    pytest.importorskip("transformers")
    from hf_helpers import import_tiny_mixtral, run_init_on_one_and_two_processes

    imp = import_tiny_mixtral(tmp_path, vocab_size=320)
    tokenizer_folder(imp, CHATML)
    convs = [[{"role": "system", "content": "hello"}, {"role": "user", "content": f"capital of france? {i}"},
              {"role": "assistant", "content": "paris" + " fine thanks" * (i % 4)}] for i in range(24)]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs])
    one, two = run_init_on_one_and_two_processes(imp, tmp_path, "--data", str(data), "--steps", "3", "--seq", "64",
                                                 "--lr", "1e-2")
    assert len(one) == 3 and min(one) > 1 and two == pytest.approx(one, rel=1e-5)
