"""A model's own Jinja chat template: the same ids as transformers' apply_chat_template, sandboxed, the SFT mask,
and a tiny imported model served over HTTP, streaming /v1/chat/completions with its template."""

from __future__ import annotations

import json

import httpx
import pytest

from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server
from pocketgpt.model.chat import ChatTemplate
from pocketgpt.model.chat_jinja import JinjaChatTemplate
from pocketgpt.model.checkpoint import load_checkpoint
from pocketgpt.training.import_hf import import_hf
from tests.hf_models import save_llama_family

transformers = pytest.importorskip("transformers")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello 床前 🚀!"}, {"role": "user", "content": "Again"}]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def imported(request, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    src, _ = save_llama_family(root / "hf", request.param, max_position_embeddings=256)
    return src, import_hf(src, root / "ck")


def test_ids_equal_transformers_apply_chat_template(imported) -> None:
    src, path = imported
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt.chat_template, JinjaChatTemplate)
    theirs = transformers.AutoTokenizer.from_pretrained(str(src))
    for msgs, gen in ((MESSAGES, True), (MESSAGES[:3], False)):
        ours = ckpt.chat_template.render(ckpt.tokenizer, msgs, add_generation_prompt=gen).ids
        assert ours == theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)


def test_sft_mask_covers_the_answer_and_its_end_token(imported) -> None:
    _, path = imported
    ckpt = load_checkpoint(path)
    tok = ckpt.tokenizer
    rendered = ckpt.chat_template.render(tok, MESSAGES[:3])
    trained = [i for i, m in zip(rendered.ids, rendered.mask, strict=True) if m]
    assert tok.decode(trained).strip() == "Hello 床前 🚀!"
    assert trained[-1] in tok.stop_ids  # the end of the turn is learned too
    assert sum(rendered.mask) == len(tok.encode_with_offsets(" Hello 床前 🚀!")[0]) + 1 or trained[-1] == tok.eot_id


def test_forged_turns_and_unsafe_templates_are_refused(imported) -> None:
    _, path = imported
    ckpt = load_checkpoint(path)
    special = next(t for t in ckpt.tokenizer.special_tokens if t != "<unk>")
    with pytest.raises(ValueError, match="message 0: content contains the special token"):
        ckpt.chat_template.render(ckpt.tokenizer, [{"role": "user", "content": f"x{special}y"}])
    # The sandbox: no way from a template to Python internals.
    escape = JinjaChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="failed to render"):
        escape.render(ckpt.tokenizer, MESSAGES)
    mutate = JinjaChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}")
    with pytest.raises(ValueError, match="failed to render"):
        mutate.render(ckpt.tokenizer, MESSAGES)
    with pytest.raises(ValueError, match="does not parse"):
        JinjaChatTemplate("{% for m in messages %}")
    refused = JinjaChatTemplate("{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="only user turns"):
        refused.render(ckpt.tokenizer, MESSAGES)


def test_our_template_exports_as_equivalent_jinja(tokenizer) -> None:
    template = ChatTemplate()
    tok = tokenizer.with_special_tokens(template.special_tokens)
    as_jinja = JinjaChatTemplate(template.to_jinja())
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ours = template.render(tok, msgs, add_generation_prompt=True)
    assert as_jinja.render(tok, msgs, add_generation_prompt=True).ids == ours.ids


def test_served_over_http_streaming_with_its_template(imported) -> None:
    _, path = imported
    ckpt = load_checkpoint(path)
    prompt = ckpt.chat_template.render(ckpt.tokenizer, MESSAGES, add_generation_prompt=True).ids
    from pocketgpt.model.generate import generate
    from pocketgpt.model.sampling import SamplingParams

    want = generate(ckpt.model, prompt, 12, params=SamplingParams(temperature=0.0))
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 12, "temperature": 0}
    with running_server(create_app(Settings(checkpoint=path))) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        forged = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": ckpt.tokenizer.special_tokens[-1]}]})
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    ends = set(ckpt.tokenizer.stop_ids)
    answer = want[: next((i for i, t in enumerate(want) if t in ends), len(want))]
    assert answer and text == ckpt.tokenizer.decode(answer)
    assert chunks[-1]["choices"][0]["finish_reason"] == ("stop" if len(answer) < len(want) else "length")
    assert forged.status_code == 422 and forged.json()["error"]["param"] == "messages"
