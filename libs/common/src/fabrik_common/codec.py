"""The one place where events become bytes and bytes become events."""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast, get_args

import msgspec

from fabrik_common.events import AnyEvent, Event

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


class EventDecodeError(ValueError):
    """A message that is not a valid event of the expected union; the text names the field."""


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


class EventCodec(Generic[T]):
    """Decodes one event type or tagged union; unknown fields are ignored."""

    def __init__(self, event_type: Any) -> None:
        self.event_type = event_type
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(event_type)

    def decode(self, data: bytes) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise EventDecodeError(f"invalid event: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise EventDecodeError(f"malformed JSON: {exc}") from exc

    def members(self) -> tuple[type[Event], ...]:
        args = get_args(self.event_type)
        return cast(tuple[type[Event], ...], args or (self.event_type,))


any_event: EventCodec[AnyEvent] = EventCodec(AnyEvent)


def decode_any(data: bytes) -> AnyEvent:
    return any_event.decode(data)


def all_event_types() -> tuple[type[Event], ...]:
    return any_event.members()
