"""The streamed answers of the OpenAI API: server-sent events of completions and chat chunks.

    return await sse_response(completion_events(stream, req, response_id, created, model, token_text))

Each generator turns a RequestStream's batches into OpenAI chunks (text held back by a
StreamCursor while it may still become a stop string), adds the usage chunk when asked, puts an
engine failure into the stream as an error event (the response has begun: as vLLM does), and
always ends with `data: [DONE]`; its `finally` closes the stream, which aborts requests still
running (a client that went away).
"""

from fastapi.responses import StreamingResponse
from ray.exceptions import GetTimeoutError, RayActorError

from moeray.errors import CollectiveError, WorkerLost
from moeray.serving import openai_api as oa
from moeray.serving import openai_responses as resp
from moeray.serving.core import RequestStream, StreamCursor

# The engine or its actors cannot answer now (a lost worker, a coordinator that timed out or died,
# a cluster that cannot place more workers): 503, the service itself keeps serving.
ENGINE_ERRORS = (WorkerLost, CollectiveError, RayActorError, GetTimeoutError)


def unavailable(exc: Exception) -> oa.OpenAIError:
    return oa.OpenAIError(503, f"engine unavailable: {exc}", code="engine_unavailable")


async def sse_response(events) -> StreamingResponse:
    """Server-sent events. The first event is taken here, before the response starts, so the
    generator is inside its try block from then on: a client that leaves before the body starts
    still closes its RequestStream (aborting its requests) when the generator is closed or
    collected; a generator that never started would run no `finally` and its requests would run
    to the end for nobody."""
    first = await events.__anext__()  # a cancelled handler (client gone) raises inside it: finally runs

    async def body():
        yield first
        async for event in events:
            yield event

    # no-cache / no buffering: proxies in front must pass each event on as it comes
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def completion_events(stream: RequestStream, req, response_id: str, created: int, model_name: str, token_text):
    cursors = [StreamCursor(p.stop) for p in stream.params]

    def chunk(choices, usage=None) -> str:
        return resp.sse(resp.CompletionResponse(id=response_id, created=created, model=model_name,
                                            choices=choices, usage=usage))
    try:
        async for batch in stream:
            choices = []
            for index, out in sorted(batch.items()):
                completion, cursor = out.outputs[0], cursors[index]
                offset = cursor.text_sent
                text, new = cursor.advance(completion)
                logprobs = (resp.completion_logprobs(completion.logprobs[new], token_text, offset)
                            if req.logprobs is not None and completion.logprobs else None)
                if text or logprobs is not None or completion.finish_reason is not None:
                    choices.append(resp.CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                       finish_reason=completion.finish_reason))
            if choices:
                yield chunk(choices)
        if req.include_usage:
            yield chunk([], resp.usage_of(stream.latest))
    except ENGINE_ERRORS as exc:  # the response has begun: the error goes in the stream (as vLLM does)
        yield resp.sse(unavailable(exc).body())
    finally:
        stream.close()  # the client went away mid-stream, or the stream ended (then a no-op)
    yield resp.SSE_DONE


async def chat_events(stream: RequestStream, req, response_id: str, created: int, model_name: str, token_text):
    cursor = StreamCursor(stream.params[0].stop)

    def chunk(choices, usage=None) -> str:
        return resp.sse(resp.ChatCompletionChunk(id=response_id, created=created, model=model_name,
                                             choices=choices, usage=usage))
    try:
        yield chunk([resp.ChatChunkChoice(index=0, delta=resp.ChatDelta(role="assistant", content=""))])
        async for batch in stream:
            completion = batch[0].outputs[0]
            text, new = cursor.advance(completion)
            logprobs = (resp.chat_logprobs(completion.logprobs[new], token_text)
                        if req.logprobs and completion.logprobs else None)
            if text or logprobs is not None or completion.finish_reason is not None:
                yield chunk([resp.ChatChunkChoice(index=0, delta=resp.ChatDelta(content=text), logprobs=logprobs,
                                                finish_reason=completion.finish_reason)])
        if req.include_usage:
            yield chunk([], resp.usage_of(stream.latest))
    except ENGINE_ERRORS as exc:
        yield resp.sse(unavailable(exc).body())
    finally:
        stream.close()
    yield resp.SSE_DONE
