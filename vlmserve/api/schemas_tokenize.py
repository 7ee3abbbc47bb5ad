"""Pydantic models of `/v1/tokenize` and `/v1/detokenize`, in vLLM's shapes plus the images' token costs."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlmserve.api.schemas import ChatMessageParam


class TokenizeRequest(BaseModel):
    """Either `prompt` (plain text) or `messages` (a chat, images included, rendered as a chat request would be).

    `model` may be left out (the server's first model)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt or messages")
        return self


class ImageTokens(BaseModel):
    """What one image of `messages` costs, in prompt tokens, at the detail it was sent with."""

    index: int
    param: str
    detail: str
    num_tokens: int | None = Field(description="null when the model's template interleaves several images' "
                                   "tokens so they cannot be told apart (see num_image_tokens)")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    num_image_tokens: int = 0
    images: list[ImageTokens] = Field(default_factory=list)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str
