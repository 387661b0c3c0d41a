"""Prompt formats (issue 12 §4): plain "{question}\\nAnswer:" or the tokenizer's chat
template, the same in training encodings, generation and the teacher-forced scorer."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from factlab.errors import FactlabError
from factlab.evaluate.generate import evaluate_qa
from factlab.evaluate.score import score_answers
from factlab.model.build import build_model
from factlab.tokens.encode import encode_qa
from factlab.tokens.prompts import completion_text, prompt_text

TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tokenizer(chat=True):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["What is the city of Ann?\nAnswer: Paris Rome"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<pad>", "<|user|>", "<|end|>", "<|assistant|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if chat:
        t.chat_template = TEMPLATE
    return t


class QA:
    question = ["What is the city of Ann?", "What is the city of Bo?"]
    answer = ["Paris", "Rome"]
    attribute = np.zeros(2, np.int16)
    person = np.arange(2)
    attributes = ("city",)

    def __len__(self):
        return 2


def test_chat_format_in_encodings_generation_and_scores():
    t = tokenizer()
    q = "What is the city of Ann?"
    assert prompt_text(q, t, "plain") == q + "\nAnswer:"
    assert prompt_text(q, t, "chat") == f"<|user|>{q}<|end|><|assistant|>"
    assert completion_text("Paris", "chat") == "Paris" and completion_text("Paris") == " Paris"
    enc = encode_qa(t, QA(), "chat")
    ex = enc.example(0)
    a0 = int(enc.answer_start[0])
    assert t.decode(ex[:a0]) == prompt_text(q, t, "chat")
    assert t.decode(ex[a0:-1]) == "Paris" and ex[-1] == t.eos_token_id
    assert t.decode(encode_qa(t, QA()).example(0)[:-1]).endswith("\nAnswer: Paris")
    model = build_model("gpt2-rope", "tiny", len(t), 64, bos_id=0, eos_id=0, pad_id=1, seed=0)
    _, recs = evaluate_qa(model, t, QA(), prompt_format="chat", max_new_tokens=3)
    assert len(recs) == 2
    plain = score_answers(model, t, QA.question, QA.answer)
    chat = score_answers(model, t, QA.question, QA.answer, prompt_format="chat")
    assert not np.allclose(plain.nll, chat.nll)  # another prompt, another score


def test_chat_format_without_a_template_or_unknown_format_is_an_error():
    t = tokenizer(chat=False)
    with pytest.raises(FactlabError, match="no chat template"):
        encode_qa(t, QA(), "chat")
    with pytest.raises(FactlabError, match="prompt_format='json'"):
        encode_qa(t, QA(), "json")
