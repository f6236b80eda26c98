"""`lav2 serve`: an OpenAI-compatible chat server and a chat page, on the answer pipeline of
`lav2 ask` (`lav2cli.answer`). `protocol` checks requests and shapes responses, `scheduler`
batches generation on one worker thread, `app` is the Starlette app on uvicorn."""
