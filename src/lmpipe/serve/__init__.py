"""HTTP server over an exported ONNX bundle: OpenAI's completions and chat completions, no torch.

    lmpipe serve models/onnx/rl [--host 127.0.0.1] [--port 8000] [--api-key KEY]

`POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`,
`GET /health` (docs/serving.md is the manual). Every bad request gets a 4xx in OpenAI's error
shape, never a 500: the body is read, bounded and parsed here (not by FastAPI), and each limit is
checked before the work it guards — body size while reading, prompt characters before
tokenizing, tokens after tokenizing and before the model.

A request holds a `Lease`: at most one of the `queue_limit` slots and the jobs it submitted. The
`Guard` middleware owns it for the whole life of the HTTP request and releases it however that
ends (response sent, client gone at any point, error, cancellation), so capacity cannot leak.
One worker thread owns the model: the requests that arrived while it was busy run together as
the next batch (up to `max_batch` rows of prompts × n), each row with its own settings; a row
that ends leaves the batch. Nothing here reads a file a client names.

Modules, bottom up: `errors` (OpenAI-shaped errors), `schema` (the body and the request
models), `limits` (`ServerLimits`, `Admission`, `Lease`), `text` (streamed text and stop
strings), `engine` (`Completer`: the model and its batching worker), `guard` (the middleware),
`app` (`create_app`: the routes), `main` (`run`: uvicorn).
"""
