import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { API_PATH, requestAPI } from './request';
import {
  EventMessage,
  ExportFormat,
  IAdapter,
  IExport,
  IJob,
  IMetrics,
  ISeries,
  IStatus
} from './types';

const POLL_MS = 2000;
const HISTORY_S = 300;
const MAX_SOCKET_DELAY_MS = 30000;

/** How the model currently hears from the server. */
export type Connection = 'connecting' | 'live' | 'polling' | 'unreachable';

/** An adapter's last export: under way, done (with its result) or refused (with the message). */
export interface IExportState {
  to: ExportFormat;
  busy: boolean;
  result?: IExport;
  error?: string;
}

/** The charted quantities: keys of `ISeries` besides `t`. */
export type SeriesKey = Exclude<keyof ISeries, 't'>;

/**
 * What the sidebar knows about the engine.
 *
 * Listens to the `events` WebSocket (metrics and jobs, about twice a second)
 * and polls `status` and `adapters` every 2 s; while the socket is down it
 * polls `metrics` and `jobs` too and reopens the socket with a backoff.
 * Views read the public fields and redraw on `changed`.
 */
export class FineInferModel implements IDisposable {
  connection: Connection = 'connecting';
  unreachableReason = ''; // why the last status request failed
  actionError: string | null = null; // the last failed Stop / Resume
  status: IStatus | null = null;
  metrics: IMetrics | null = null;
  jobs: IJob[] = [];
  adapters: IAdapter[] = [];
  history: ISeries = emptySeries(); // the last five minutes, server clock
  exports: { [adapter: string]: IExportState } = {};

  constructor(settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {
    this._settings = settings;
    this._poll = new Poll({
      name: 'fineinfer-jupyter:model',
      factory: () => this._tick(),
      frequency: { interval: POLL_MS, backoff: false },
      standby: () => !this._active || 'when-hidden'
    });
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._poll.isDisposed;
  }

  /** Whether someone is looking: an inactive model neither polls nor listens. */
  set active(value: boolean) {
    this._active = value;
    if (value) {
      void this._poll.refresh();
    } else {
      this._closeSocket();
    }
  }

  stopJob(id: string): Promise<void> {
    return this._jobAction(id, 'stop');
  }

  resumeJob(id: string): Promise<void> {
    return this._jobAction(id, 'resume');
  }

  /** Export an adapter for llama.cpp / Ollama (`gguf`) or vLLM (`vllm`), under the data directory. */
  async exportAdapter(name: string, to: ExportFormat): Promise<void> {
    this.exports[name] = { to, busy: true };
    this._changed.emit();
    const path = `adapters/${encodeURIComponent(name)}/export`;
    try {
      const init = { method: 'POST', body: JSON.stringify({ to }) };
      const result = await requestAPI<IExport>(path, init, this._settings);
      this.exports[name] = { to, busy: false, result };
    } catch (error) {
      this.exports[name] = { to, busy: false, error: (error as Error).message };
    }
    this._changed.emit();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._poll.dispose();
    this._closeSocket();
    Signal.clearData(this);
  }

  private async _tick(): Promise<void> {
    try {
      this.status = await requestAPI<IStatus>('status', {}, this._settings);
    } catch (error) {
      this.connection = 'unreachable';
      this.unreachableReason = unreachableReason(error);
      this._changed.emit();
      return;
    }
    const live = this._socket?.readyState === WebSocket.OPEN;
    const get = <T>(path: string, use: (answer: T) => void) =>
      requestAPI<T>(path, {}, this._settings).then(use, () => undefined); // e.g. 503 while loading: keep the last answer
    await Promise.all([
      get<{ adapters: IAdapter[] }>('adapters', a => (this.adapters = a.adapters)),
      live ? null : get<IMetrics>('metrics', m => this._addMetrics(m)),
      live ? null : get<{ jobs: IJob[] }>('jobs', j => (this.jobs = j.jobs))
    ]);
    this.connection = live ? 'live' : 'polling';
    if (!this._socket && Date.now() >= this._nextSocketTry) {
      this._openSocket();
    }
    this._changed.emit();
  }

  private _openSocket(): void {
    // as JupyterLab's own services (e.g. the event manager) pass the token
    const { appendToken, token, wsUrl, WebSocket } = this._settings;
    let url = URLExt.join(wsUrl, API_PATH, 'events');
    if (appendToken && token !== '') {
      url += `?token=${encodeURIComponent(token)}`;
    }
    const socket = new WebSocket(url);
    socket.onopen = () => {
      this._socketFailures = 0;
      this.connection = 'live';
      this._changed.emit();
    };
    socket.onmessage = event => {
      let message: EventMessage;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.type === 'metrics') {
        this._addMetrics(message.data);
      } else if (message.type === 'jobs') {
        this.jobs = message.data;
      }
      this._changed.emit();
    };
    socket.onclose = () => {
      if (this._socket !== socket) {
        return;
      }
      this._socket = null;
      this._socketFailures += 1;
      const delay = Math.min(POLL_MS * 2 ** (this._socketFailures - 1), MAX_SOCKET_DELAY_MS);
      this._nextSocketTry = Date.now() + delay;
      if (this.connection === 'live') {
        this.connection = 'polling';
        this._changed.emit();
      }
    };
    this._socket = socket;
  }

  private _closeSocket(): void {
    const socket = this._socket;
    this._socket = null;
    socket?.close();
  }

  private _addMetrics(m: IMetrics): void {
    this.metrics = m;
    if (m.series && m.series.t.length > 0) {
      this.history = copySeries(m.series); // the server's own one-per-second history
    }
    const h = this.history;
    if (h.t.length === 0 || m.time > h.t[h.t.length - 1] + 0.5) {
      h.t.push(m.time);
      h.inference_tokens_per_s.push(m.inference?.tokens_per_s ?? null);
      h.train_samples_per_s.push(m.training?.samples_per_s ?? null);
      h.loss.push(m.training?.loss ?? null);
      h.slack.push(m.slack?.min ?? null);
      h.offload_bytes_per_s.push(m.offload?.bytes_per_s ?? null);
    }
    const keep = this.history.t.findIndex(t => t >= m.time - HISTORY_S);
    if (keep > 0) {
      for (const values of Object.values(this.history)) {
        values.splice(0, keep);
      }
    }
  }

  private async _jobAction(id: string, action: 'stop' | 'resume'): Promise<void> {
    const path = `jobs/${encodeURIComponent(id)}/${action}`;
    try {
      const job = await requestAPI<IJob>(path, { method: 'POST' }, this._settings);
      this.jobs = this.jobs.map(j => (j.id === job.id ? job : j));
      this.actionError = null;
      void this._poll.refresh(); // adapters (their "training" flag) and status change too
    } catch (error) {
      this.actionError = `Could not ${action} ${id}: ${(error as Error).message}`;
    }
    this._changed.emit();
  }

  private _settings: ServerConnection.ISettings;
  private _poll: Poll;
  private _active = false;
  private _socket: WebSocket | null = null;
  private _socketFailures = 0;
  private _nextSocketTry = 0;
  private _changed = new Signal<this, void>(this);
}

/** What to tell the user when `status` does not answer. */
function unreachableReason(error: unknown): string {
  if (error instanceof ServerConnection.NetworkError) {
    return 'The Jupyter server does not answer';
  }
  if (error instanceof ServerConnection.ResponseError && error.response.status === 404) {
    return 'The fineinfer_jupyter server extension does not answer (HTTP 404); see "jupyter server extension list"';
  }
  return (error as Error).message;
}

function emptySeries(): ISeries {
  return {
    t: [],
    inference_tokens_per_s: [],
    train_samples_per_s: [],
    loss: [],
    slack: [],
    offload_bytes_per_s: []
  };
}

/** A copy of the server's series, with missing columns filled with gaps. */
function copySeries(s: ISeries): ISeries {
  const copy = emptySeries();
  for (const key of Object.keys(copy) as (keyof ISeries)[]) {
    copy[key] = (s[key] ? [...s[key]] : s.t.map(() => null)) as number[];
  }
  return copy;
}
