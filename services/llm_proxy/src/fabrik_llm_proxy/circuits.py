"""Circuit breakers per deployment and per provider key.

closed: calls pass. open: calls skip this deployment/key until `open_until`. half-open: the
cooldown has passed and one probe call is let through; its success closes the circuit, its
failure opens it again. A deployment opens after `failure_threshold` consecutive failures
(5xx, timeouts, connection errors) or when its upstream asks to wait longer than the proxy
retries for; a key opens at once on 401/403 (bad or revoked key) or 429 (its own quota).
State is per replica (each replica learns about upstream health from its own calls).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Gauge

CircuitState = Literal["closed", "open", "half_open"]
CircuitKind = Literal["deployment", "key"]
_STATE_VALUE: dict[CircuitState, int] = {"closed": 0, "half_open": 1, "open": 2}
PROBE_TIMEOUT = 60.0


@dataclass
class Circuit:
    kind: CircuitKind
    name: str
    state: CircuitState = "closed"
    failures: int = 0
    open_until: float = 0.0
    reason: str = ""
    opened_count: int = 0
    probing: bool = False
    probe_started: float = 0.0
    last_change: float = 0.0

    def remaining(self, now: float) -> float:
        return max(0.0, self.open_until - now) if self.state == "open" else 0.0


class Circuits:
    def __init__(self, gauge: Gauge | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._circuits: dict[tuple[CircuitKind, str], Circuit] = {}
        self._gauge = gauge
        self._clock = clock

    def get(self, kind: CircuitKind, name: str) -> Circuit:
        circuit = self._circuits.get((kind, name))
        if circuit is None:
            circuit = self._circuits[(kind, name)] = Circuit(kind, name)
            self._publish(circuit)
        return circuit

    def _set(self, circuit: Circuit, state: CircuitState) -> None:
        if circuit.state != state:
            circuit.state = state
            circuit.last_change = time.time()
            self._publish(circuit)

    def _publish(self, circuit: Circuit) -> None:
        if self._gauge is not None:
            self._gauge.labels(circuit.kind, circuit.name).set(_STATE_VALUE[circuit.state])

    def available(self, kind: CircuitKind, name: str) -> bool:
        """May a call use this deployment/key now? Moves an expired open circuit to half-open."""
        circuit = self._circuits.get((kind, name))
        if circuit is None or circuit.state == "closed":
            return True
        now = self._clock()
        if circuit.state == "open":
            if now < circuit.open_until:
                return False
            self._set(circuit, "half_open")
            circuit.probing, circuit.probe_started = True, now
            return True
        # half-open: one probe at a time (a probe that never reported is replaced after a while)
        if not circuit.probing or now - circuit.probe_started > PROBE_TIMEOUT:
            circuit.probing, circuit.probe_started = True, now
            return True
        return False

    def release(self, kind: CircuitKind, name: str) -> None:
        """A probe ended without saying anything about this circuit: let the next call probe."""
        circuit = self._circuits.get((kind, name))
        if circuit is not None:
            circuit.probing = False

    def peek(self, kind: CircuitKind, name: str) -> bool:
        """Like `available` but without claiming a half-open probe."""
        circuit = self._circuits.get((kind, name))
        if circuit is None or circuit.state == "closed":
            return True
        return circuit.state == "open" and self._clock() >= circuit.open_until

    def success(self, kind: CircuitKind, name: str) -> None:
        circuit = self._circuits.get((kind, name))
        if circuit is None:
            return
        circuit.failures = 0
        circuit.reason = ""
        circuit.probing = False
        self._set(circuit, "closed")

    def failure(
        self,
        kind: CircuitKind,
        name: str,
        *,
        reason: str,
        threshold: int,
        cooldown: float,
        immediate: bool = False,
    ) -> bool:
        """Count a failure; open when the threshold is reached (or at once). True if now open."""
        circuit = self.get(kind, name)
        circuit.failures += 1
        circuit.reason = reason
        if immediate or circuit.state == "half_open" or circuit.failures >= threshold:
            now = self._clock()
            circuit.open_until = max(circuit.open_until, now + cooldown)
            circuit.opened_count += 1
            circuit.probing = False
            self._set(circuit, "open")
            return True
        return False

    def retry_after(self, kind: CircuitKind, name: str) -> float:
        circuit = self._circuits.get((kind, name))
        return circuit.remaining(self._clock()) if circuit else 0.0

    def snapshot(self) -> list[dict[str, object]]:
        now = self._clock()
        return [
            {
                "kind": c.kind,
                "name": c.name,
                "state": "half_open" if c.state == "open" and now >= c.open_until else c.state,
                "consecutive_failures": c.failures,
                "retry_in_seconds": round(c.remaining(now), 3),
                "reason": c.reason,
                "times_opened": c.opened_count,
            }
            for c in sorted(self._circuits.values(), key=lambda c: (c.kind, c.name))
        ]
