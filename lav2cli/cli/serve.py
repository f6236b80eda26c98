"""`lav2 serve`: an OpenAI-compatible chat server and a chat page (lav2cli.serve)."""

from __future__ import annotations

import typer

from lav2cli.answer import Pipeline, marked_self_caption
from lav2cli.cli.common import (EXPERTS_HELP, CaptionModel, CaptionThreshold, Experts, OcrEngineOption,
                                SelfCaption, load_engine, log_to_stderr)
from lav2cli.errors import Lav2Error
from lav2cli.experts import ExpertOptions, OcrEngine
from lav2cli.registry import DEFAULT_MODEL
from lav2cli.serve.app import Settings, check_port, local_images_dir, run
from lav2cli.serve.protocol import Limits
from lav2cli.serve.scheduler import Scheduler

app = typer.Typer(add_completion=False)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command(epilog=EXPERTS_HELP)
def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model reference: a name, an artifact or base directory, a .gguf, or an official .pth."),
    base: str | None = typer.Option(None, help="Base LLaMA (Meta or HF directory) for an official .pth, or to override an artifact's."),
    clip: str | None = typer.Option(None, help="open_clip encoder NAME[:PRETRAINED] (tag or weights file), e.g. ViT-L-14:openai."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="LAV2_API_KEY", help="Require 'Authorization: Bearer KEY' on every /v1 request (or set LAV2_API_KEY)."),
    served_name: str | None = typer.Option(None, "--served-name", help="The model's name in the API (default: the --model reference)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="At most this many requests decoded in one batch."),
    batch_wait_ms: float = typer.Option(20.0, "--batch-wait-ms", min=0.0, help="When idle, wait this long after a request for others to batch with it."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="New tokens of an answer whose request names no max_tokens."),
    temperature: float = typer.Option(0.1, min=0.0, max=2.0, help="Temperature of a request that names none; 0 = greedy."),
    top_p: float = typer.Option(0.75, min=0.0, max=1.0, help="top_p of a request that names none."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001, help="Refuse request bodies above this size (MiB) with 413."),
    allow_local_images: str | None = typer.Option(None, "--allow-local-images", metavar="DIR", help="Let image_url name a file in DIR (a path or file:// URL); refused otherwise."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step (pays off on a GPU)."),
    log_level: str = typer.Option("info", help="uvicorn's log level: critical, error, warning, info, debug."),
    expert: Experts = [], caption_model: CaptionModel = None, caption_threshold: CaptionThreshold = 0.2,
    ocr_engine: OcrEngineOption = OcrEngine.rapidocr, self_caption: SelfCaption = True,
) -> None:
    """Serve a model over HTTP: an OpenAI-compatible chat API and a chat page.

    GET / is the chat page, POST /v1/chat/completions the OpenAI chat API (text and image_url parts with data: URLs, stream, max_tokens, temperature, top_p, stop, seed), GET /v1/models, GET /health. Answers go through the answer pipeline of `lav2 ask` (experts and self-captioning included); requests that arrive together are decoded in one batch. SIGTERM or Ctrl-C finishes the requests in flight, then exits.

    Examples:

      lav2 serve                     # the demo model on http://127.0.0.1:8000

      lav2 serve --model smollm2-135m-instruct --expert caption --port 8080

      LAV2_API_KEY=secret lav2 serve --host 0.0.0.0 --max-batch 16

      curl http://127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
    """
    log = log_to_stderr()
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise Lav2Error(f"--log-level {log_level}: expected critical, error, warning, info or debug")
    local = local_images_dir(allow_local_images)
    check_port(host, port)  # before the model loads: a busy port fails at once
    if host not in LOOPBACK and not api_key:
        log(f"warning: listening on {host} without --api-key: anyone who can reach this address can use the model")
    named = ExpertOptions.make(expert, caption_model=caption_model, caption_threshold=caption_threshold,
                               ocr_engine=ocr_engine, device=device, dtype=dtype)
    pipeline = Pipeline.make(named, marked=marked_self_caption(model), self_caption=self_caption)
    pipeline.load()  # an expert that cannot run fails before the model loads
    engine = load_engine(model, base=base, clip=clip, device=device, dtype=dtype, inference=True)
    engine.compile_decode = compile
    pipeline.bind(engine)
    scheduler = Scheduler(engine, pipeline, max_batch=max_batch, wait_s=batch_wait_ms / 1000,
                          default_max_tokens=max_tokens, log=log)
    limits = Limits(served_name or model, temperature=temperature, top_p=top_p, local_images=local)
    run(scheduler, Settings(limits, api_key=api_key, max_body=int(max_body_mb * 2**20)), host=host, port=port,
        log_level=log_level, log=log)
