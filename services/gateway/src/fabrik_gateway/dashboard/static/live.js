// The live stream (GET /api/v1/stream as a WebSocket): reconnects with the last cursor, so no event
// is lost or repeated across a reconnect; reports its status for the "live" indicator.
import { streamUrl } from "./api.js";

export class LiveStream {
  /**
   * @param {object} query  stream filters (project, run_id, types, logs)
   * @param {(msg: object) => void} onMessage  every event or log chunk
   * @param {(status: string, detail?: string) => void} onStatus  "connecting" | "live" | "down"
   */
  constructor(query, onMessage, onStatus) {
    this.query = query;
    this.onMessage = onMessage;
    this.onStatus = onStatus || (() => {});
    this.cursor = null;
    this.closed = false;
    this.retry = 500;
    this.ws = null;
    this.timer = null;
    this.open();
  }

  open() {
    if (this.closed) return;
    this.onStatus("connecting");
    const query = { ...this.query };
    if (this.cursor) query.cursor = this.cursor;
    const ws = new WebSocket(streamUrl(query));
    this.ws = ws;
    ws.addEventListener("open", () => {
      this.retry = 500;
      this.onStatus("live");
    });
    ws.addEventListener("message", (e) => {
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch (err) {
        this.onStatus("down", `unreadable message: ${err.message}`);
        return;
      }
      if (msg.cursor) this.cursor = msg.cursor;
      if (msg.type === "heartbeat") return;
      if (msg.type === "error") {
        this.onStatus("down", (msg.problem && msg.problem.detail) || "stream error");
        return;
      }
      this.onMessage(msg);
    });
    ws.addEventListener("close", (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.closed) return;
      if (e.code === 1008) {
        this.onStatus("down", e.reason || "refused");
        return;
      }
      if (e.code === 1006 && !this.everOpened) this.onStatus("down", "connection refused (credentials?)");
      else this.onStatus("down", e.reason || "disconnected, reconnecting");
      this.timer = setTimeout(() => this.open(), this.retry);
      this.retry = Math.min(this.retry * 2, 15000);
    });
    ws.addEventListener("open", () => {
      this.everOpened = true;
    });
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      if (ws.readyState === WebSocket.CONNECTING) ws.addEventListener("open", () => ws.close(1000));
      else ws.close(1000);
    }
  }
}

export function liveIndicator() {
  const el = document.createElement("span");
  el.className = "live connecting";
  el.textContent = "connecting";
  el.setAttribute("role", "status");
  return {
    el,
    set(status, detail) {
      el.className = `live ${status}`;
      el.textContent = status === "live" ? "live" : status === "connecting" ? "connecting…" : "offline";
      el.title = detail || status;
    },
  };
}
