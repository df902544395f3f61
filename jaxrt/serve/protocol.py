"""OpenAI request bodies (pydantic) and their translation to `SamplingParams`.

Strict types (a string is not an integer, `true` is not a number), no NaN or infinity, and
unknown fields refused with a 400, as OpenAI does. Fields OpenAI has that jaxrt cannot
honour (`logit_bias`, tools, `suffix`, `best_of` != n) are accepted only at their neutral
value and refused otherwise. `echo` with `logprobs` returns the prompt tokens' logprobs
first (`SamplingParams.prompt_logprobs`). vLLM's extensions are accepted: `top_k`,
`min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, on completions
`prompt_logprobs`, and structured output's `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`. OpenAI's `response_format` takes `text`,
`json_object` (any JSON object) and `json_schema` (`{"json_schema": {"name", "schema"}}`).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..runtime.request import SamplingParams

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_N = 128          # samples per prompt
MAX_STOP = 16        # stop strings per request
DEFAULT_COMPLETION_TOKENS = 16   # OpenAI's max_tokens of /v1/completions, omitted or null

Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int64 = Annotated[StrictInt, Field(ge=-(2 ** 63), lt=2 ** 63)]
TokenId = Annotated[StrictInt, Field(ge=0, lt=2 ** 31)]


class BadRequest(ValueError):
    """A request that is well-formed JSON but asks for something not allowed; `param`
    names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    """`include_usage`: a last chunk with the usage of the whole run (OpenAI).
    `continuous_usage_stats` (vLLM's, only with `include_usage`): every chunk also carries
    the usage of its choice so far."""
    model_config = _STRICT
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class JsonSchemaFormat(BaseModel):
    model_config = _STRICT
    name: StrictStr
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: StrictStr | None = None
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(BaseModel):
    """Fields both endpoints share."""
    model_config = _STRICT
    model: StrictStr
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None   # -1 or 0: off (vLLM)
    min_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None
    seed: Int64 | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=1024)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0.0, le=10.0)] | None = None
    ignore_eos: StrictBool = False
    user: StrictStr | None = None
    logit_bias: dict[StrictStr, Float] | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[StrictStr], Field(min_length=1, max_length=1024)] | None \
        = None
    guided_grammar: StrictStr | None = None

    def constraint(self) -> dict[str, Any]:
        """The structured-output SamplingParams fields this request sets (at most one)."""
        given = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given["json_schema"] = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise BadRequest("response_format json_schema needs json_schema.schema",
                                 "response_format")
            given["json_schema"] = fmt.json_schema.schema_
        for field, name in (("guided_json", "json_schema"), ("guided_regex", "regex"),
                            ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            value = getattr(self, field)
            if value is not None:
                if given:
                    raise BadRequest(f"{field}: only one of response_format, guided_json, "
                                     f"guided_regex, guided_choice, guided_grammar may "
                                     f"be given", field)
                given[name] = value
        return given

    def _check_common(self) -> None:
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed when stream is true",
                             "stream_options")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats \
                and not self.stream_options.include_usage:
            # vLLM ignores it then; a setting the server would drop is refused instead
            raise BadRequest("stream_options.continuous_usage_stats needs include_usage",
                             "stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise BadRequest("stop strings must be non-empty", "stop")

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            min_p=0.0 if self.min_p is None else float(self.min_p),
            seed=self.seed, stop=stops, stop_token_ids=tuple(self.stop_token_ids or ()),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
            repetition_penalty=1.0 if self.repetition_penalty is None
            else float(self.repetition_penalty),
            ignore_eos=self.ignore_eos, **self.constraint())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


Prompt = (StrictStr | Annotated[list[TokenId], Field(min_length=1)]
          | Annotated[list[StrictStr], Field(min_length=1)]
          | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = DEFAULT_COMPLETION_TOKENS
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    suffix: StrictStr | None = None
    prompt_logprobs: Annotated[StrictInt, Field(ge=0)] | None = None  # vLLM's extension

    @property
    def max_output_tokens(self) -> int:
        """null is the default, as OpenAI has it."""
        return DEFAULT_COMPLETION_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def prompt_logprobs_wanted(self) -> int | None:
        """`SamplingParams.prompt_logprobs`: vLLM's field, and `logprobs` under `echo`
        (OpenAI returns the prompt tokens' logprobs then)."""
        echo = self.logprobs if self.echo else None
        wanted = [n for n in (echo, self.prompt_logprobs) if n is not None]
        return max(wanted) if wanted else None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def check(self) -> None:
        self._check_common()
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequest("best_of must equal n (jaxrt returns every sample)", "best_of")
        if self.suffix:
            raise BadRequest("suffix (insertion) is not supported", "suffix")


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: StrictBool | None = None

    def check(self) -> None:
        self._check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs to be true", "top_logprobs")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise BadRequest("max_tokens and max_completion_tokens disagree",
                             "max_completion_tokens")

    @property
    def max_output_tokens(self) -> int | None:
        """None (both omitted or null): up to the context length."""
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        out = []
        for m in self.messages:
            # "developer" is OpenAI's new name for the system role; templates know "system"
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text()})
        return out
