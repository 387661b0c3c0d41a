"""How a question and its answer become text for a given model: the world's plain format
(``"{question}\\nAnswer:"`` + ``" {answer}"``, what factlab's own models are trained on)
or the tokenizer's chat template (a pretrained instruct model such as SmolLM2 answers in
its assistant turn: the answer with no leading space, then the template's end token as
EOS). Training (``encode_qa``), generation (``evaluate_qa``) and the teacher-forced
scorer take the same ``prompt_format`` so the three agree token for token."""

from __future__ import annotations

from factlab.errors import FactlabError

FORMATS = ("plain", "chat")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FactlabError(f"prompt_format={fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def prompt_text(question: str, tokenizer=None, fmt: str = "plain") -> str:
    from factlab.text.qa import prompt

    if check_format(fmt) == "plain":
        return prompt(question)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise FactlabError("prompt_format=chat: the tokenizer has no chat template "
                           "(use prompt_format=plain)")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)


def completion_text(answer: str, fmt: str = "plain") -> str:
    from factlab.text.qa import completion

    return completion(answer) if check_format(fmt) == "plain" else answer
