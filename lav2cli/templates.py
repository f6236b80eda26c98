"""Prompt templates, label masking, and the other prompt text lav2 writes.

`alpaca` is the official LLaMA-Adapter template, text exact; `chatml` is the chat format of
SmolLM2 and other ChatML models. Expert context and record `input` go into the Input section
(alpaca) or a context paragraph before the question (chatml).

A conversation (`lav2 serve`: earlier turns and a system message) is rendered by the same
`Template.prompt`. chatml has real turns: the system message replaces the default system turn,
each earlier exchange is a user turn and an assistant turn, and the context paragraph joins the
last user turn. alpaca was trained on single instructions, so the conversation is folded into
the Input section: the system message, then "Conversation so far:" with one "User: ..." and one
"Assistant: ..." paragraph per earlier message, then the context; the last user message is the
Instruction. The captioning instruction and the
experts' labels live here too: `lav2 prepare` writes them into training data and the experts
put them in prompts, so both must read the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

from lav2cli.errors import Lav2Error
from lav2cli.tokenizer import Tokenizer

IGNORE_INDEX = -100

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
# MME / short answers: the official evaluation's variant of the first sentence
SHORT_ANSWER_SUFFIX = " using a single word or phrase."

CHATML_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# the instruction of caption records, and what a captioning model is asked
CAPTION_INSTRUCTION = "Generate caption of this image"
# how each expert's text is introduced in the prompt
EXPERT_LABELS = {"caption": "Image caption", "ocr": "Text in the image"}
# the caption expert's source when the answering model captions the image itself
SELF_CAPTION_SOURCE = "the model itself"
# alpaca: how earlier turns of a conversation are introduced in the Input section
HISTORY_HEADING = "Conversation so far:"
HISTORY_SPEAKERS = {"user": "User", "assistant": "Assistant"}


def labelled(name: str, text: str) -> str:
    """Expert `name`'s text as a prompt paragraph: "Image caption: a red circle"."""
    sep = "\n" if "\n" in text.strip() else " "  # OCR lines stay lines
    return f"{EXPERT_LABELS[name]}:{sep}{text.strip()}"


def join_context(*parts: str) -> str:
    """Several contexts (a record's input, the experts') as one, empty ones left out."""
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


@dataclass(frozen=True)
class Turn:
    """One earlier exchange of a conversation: what the user said and what the model answered."""

    user: str
    assistant: str


def history_text(history: tuple[Turn, ...] | list[Turn]) -> str:
    """alpaca's folded conversation: a heading, then one "User: ..." / "Assistant: ..." paragraph
    per message ("" without history)."""
    if not history:
        return ""
    lines = [HISTORY_HEADING]
    for t in history:
        lines += [f"{HISTORY_SPEAKERS['user']}: {t.user.strip()}", f"{HISTORY_SPEAKERS['assistant']}: {t.assistant.strip()}"]
    return "\n".join(lines)


@dataclass(frozen=True)
class Template:
    name: str

    @property
    def add_bos(self) -> bool:
        return self.name == "alpaca"  # chatml prompts start with their own <|im_start|>

    def prompt(self, instruction: str, input: str = "", short_answer: bool = False,
               history: tuple[Turn, ...] = (), system: str = "") -> str:
        """The prompt of `instruction` with context `input`; `history` (earlier exchanges) and
        `system` (a system message) make it a conversation (see the module docstring)."""
        instruction, input = instruction.strip(), (input or "").strip()
        if self.name == "alpaca":
            input = join_context(system, history_text(history), input)
            head = ALPACA_PREAMBLE_INPUT if input else ALPACA_PREAMBLE
            if short_answer:
                head = head.replace(" the request.\n\n", " the request" + SHORT_ANSWER_SUFFIX + "\n\n")
            if input:
                return f"{head}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
            return f"{head}### Instruction:\n{instruction}\n\n### Response:"
        content = f"{input}\n\n{instruction}" if input else instruction
        if short_answer:
            content += "\nAnswer using a single word or phrase."
        turns = "".join(f"<|im_start|>user\n{t.user.strip()}<|im_end|>\n"
                        f"<|im_start|>assistant\n{t.assistant.strip()}<|im_end|>\n" for t in history)
        return (
            f"<|im_start|>system\n{system.strip() or CHATML_SYSTEM}<|im_end|>\n{turns}"
            f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        )

    def end_ids(self, tok: Tokenizer) -> list[int]:
        """Tokens that close a supervised response (EOS; <|im_end|> for chatml)."""
        if self.name == "chatml":
            ids = tok.encode("<|im_end|>")
            if len(ids) == 1:
                return ids
        return [tok.eos_id]

    def encode_prompt(self, tok: Tokenizer, instruction: str, input: str = "", short_answer: bool = False,
                      history: tuple[Turn, ...] = (), system: str = "") -> list[int]:
        return tok.encode(self.prompt(instruction, input, short_answer, history, system), bos=self.add_bos)

    def encode_example(self, tok: Tokenizer, instruction: str, input: str, output: str,
                       max_tokens: int | None = None, short_answer: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels: prompt tokens masked (IGNORE_INDEX), response + end supervised."""
        prompt = self.encode_prompt(tok, instruction, input, short_answer)
        text = self.prompt(instruction, input, short_answer)
        # prompt and response tokenised together, as the official data pipeline does (the response
        # follows "### Response:" directly); apart only if the joint tokens do not start with
        # the prompt's, so the mask boundary is always exact
        joint = tok.encode(text + output.strip(), bos=self.add_bos)
        if joint[: len(prompt)] == prompt and len(joint) > len(prompt):
            response = joint[len(prompt):] + self.end_ids(tok)
        else:
            response = tok.encode(output.strip()) + self.end_ids(tok)
        ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
        if max_tokens is not None:
            ids, labels = ids[:max_tokens], labels[:max_tokens]
        return ids, labels


TEMPLATES = ("alpaca", "chatml")


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise Lav2Error(f"unknown template {name!r} (expected one of {', '.join(TEMPLATES)})")
    return Template(name)

