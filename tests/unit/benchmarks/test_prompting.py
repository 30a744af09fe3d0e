from sa_bench.benchmarks.base import Sample
from sa_bench.models.loading import ModelConfig, load_tokenizer
from sa_bench.models.prompting import build_request


def tokenizer(template: bool):
    tok = load_tokenizer(ModelConfig(name="tiny", pretrained="embedded:tiny-retrieval"))
    if template:
        tok.chat_template = (
            "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    return tok


def test_answer_prefix_follows_the_assistant_header_or_the_question():
    sample = Sample(id="0", context="doc doc doc", question=" Q?", answers=["a"],
                    answer_prefix=" Answer:")
    for template, expected in [(True, " Q?<|assistant|> Answer:"), (False, " Q? Answer:")]:
        tok = tokenizer(template)
        req = build_request(sample, tok, chat=True, max_prompt_tokens=1000)
        assert tok.decode(req.question_ids) == expected
        assert "doc doc doc" in tok.decode(req.context_ids)


def test_context_is_shared_by_questions_on_one_document():
    tok = tokenizer(False)
    a = build_request(Sample("a", "same document", " Q1?", ["x"]), tok, False, 1000)
    b = build_request(Sample("b", "same document", " Q2?", ["y"]), tok, False, 1000)
    assert a.context_ids == b.context_ids and a.question_ids != b.question_ids


def test_template_kwargs_reach_the_chat_template():
    tok = tokenizer(False)
    tok.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    )
    sample = Sample("a", "doc", " Q?", ["x"])
    plain = build_request(sample, tok, True, 1000)
    no_think = build_request(sample, tok, True, 1000, {"enable_thinking": False})
    assert "<think>" not in tok.decode(plain.question_ids)
    assert tok.decode(no_think.question_ids).endswith("<|assistant|><think></think>")
