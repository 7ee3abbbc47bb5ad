"""`/v1/tokenize` and `/v1/detokenize`: what a prompt costs before it is sent, images included.

Chat messages go through the chat service's own preparation (media intake, template, processor), so the count is
exactly what a chat request with the same messages would be charged as `usage.prompt_tokens`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from vlmserve.api import schemas
from vlmserve.api.schemas_tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    ImageTokens,
    TokenizeRequest,
    TokenizeResponse,
)
from vlmserve.api.serving_chat import ChatService
from vlmserve.errors import InvalidRequestError, ModelNotFoundError, UnsupportedFeatureError
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import PreparedPrompt


class TokenizeService:
    def __init__(self, chat: ChatService, renderer: PromptRenderer, *, max_model_len: int,
                 served_model_names: tuple[str, ...]) -> None:
        self._chat = chat
        self._renderer = renderer
        self._max_model_len = max_model_len
        self._names = served_model_names

    @property
    def _tokenizer(self) -> Any:
        # looked up per call: the renderer owns the processor (and tests build apps without one)
        return self._renderer.tokenizer

    def _model(self, model: str | None) -> str:
        if model is None:
            return self._names[0]
        if model not in self._names:
            raise ModelNotFoundError(f"the model {model!r} does not exist here; served models: "
                                     f"{', '.join(self._names)}", param="model")
        return model

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        model = self._model(request.model)
        if request.messages is None:
            add_special = True if request.add_special_tokens is None else request.add_special_tokens
            ids = await asyncio.to_thread(self._encode, request.prompt or "", add_special)
            return self._response(ids, request.return_token_strs)
        if not request.add_generation_prompt or request.continue_final_message:
            raise UnsupportedFeatureError("messages are rendered as a chat request is: with the generation prompt "
                                          "and without continuing the final message", param="add_generation_prompt")
        if request.add_special_tokens:
            raise UnsupportedFeatureError("the chat template places special tokens itself; add_special_tokens "
                                          "must be false or left out with messages", param="add_special_tokens")
        chat_request = schemas.ChatCompletionRequest(model=model, messages=request.messages, max_tokens=1)
        generation, _ = await self._chat.prepare(chat_request)
        response = self._response(generation.prompt.token_ids, request.return_token_strs)
        response.num_image_tokens = generation.prompt.num_image_tokens
        response.images = _image_costs(request.messages, generation.prompt)
        return response

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._model(request.model)
        vocab = len(self._tokenizer)
        if any(t >= vocab for t in request.tokens):
            raise InvalidRequestError(f"token ids must be below the vocabulary size {vocab}", param="tokens")
        return DetokenizeResponse(prompt=str(self._tokenizer.decode(request.tokens)))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [int(t) for t in self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]
        return ids

    def _response(self, ids: list[int], with_strs: bool) -> TokenizeResponse:
        strs = [str(s) for s in self._tokenizer.convert_ids_to_tokens(ids)] if with_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self._max_model_len, tokens=ids, token_strs=strs)


def _image_costs(messages: list[schemas.ChatMessageParam], prompt: PreparedPrompt) -> list[ImageTokens]:
    refs = [(f"messages[{i}].content[{j}].image_url", part.image_url.detail)
            for i, message in enumerate(messages) if isinstance(message.content, list)
            for j, part in enumerate(message.content) if part.image_url is not None]
    by_index = {span.index: span.end - span.start for span in prompt.image_spans if span.index >= 0}
    return [ImageTokens(index=k, param=param, detail=detail, num_tokens=by_index.get(k))
            for k, (param, detail) in enumerate(refs)]
