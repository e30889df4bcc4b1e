// The JSON shapes of docs/api.md, as far as the sidebar reads them.

export type EngineState = 'loading' | 'ready' | 'error';
export type IterationKind = 'decode' | 'prefill' | 'train' | 'idle';
export type JobState =
  | 'queued'
  | 'running'
  | 'stopped'
  | 'done'
  | 'failed'
  | 'cancelled'
  | 'interrupted'; // queued or running when the server stopped: resumable

export interface IStatus {
  state: EngineState;
  progress: string | null; // e.g. "converting default model (step 2/3)"
  error: string | null;
  model: {
    name: string;
    path: string;
    device: string;
    dtype: string;
    dtype_reason?: string; // how "auto" chose, or "set"
    parameters: number;
    quantize?: 'none' | 'nf4' | 'int8';
    weight_bytes?: number; // the base's weights as loaded
  } | null;
  policy: string;
  adapters: string[];
  // what the loaded model can do here; lacking: feature -> why not (README "Models")
  features?: { available: string[]; lacking: Record<string, string> } | null;
  version: string;
}

/** Layer offload: decoder layers over the memory budget fetched as they run. */
export interface IOffload {
  enabled: boolean;
  mode: 'none' | 'cpu' | 'disk';
  layers?: number; // offloaded decoder layers
  bytes_per_s: number;
  bytes_total: number;
  shared_bytes?: number; // not fetched for training: an inference pass had the layer
}

/** The prefix cache: finished requests' KV kept for prompts that start the same way. */
export interface IPrefixCache {
  budget_bytes: number; // 0: off
  bytes: number;
  entries: number;
  hit_rate: number | null; // hits / lookups
  tokens_saved: number; // prompt tokens not prefilled again
}

export interface IMetrics {
  time: number; // server clock, seconds
  state: EngineState;
  iteration: { kind: IterationKind; started: number }; // what the engine runs now
  requests: { waiting: number; running: number; finished: number; failed: number };
  slack: { min: number | null }; // seconds the most urgent request can still wait
  inference: { tokens_per_s: number };
  training: {
    job: string | null;
    samples_per_s: number;
    loss: number | null;
  } | null;
  offload: IOffload;
  prefix_cache?: IPrefixCache;
  series?: ISeries; // one point per second over the last five minutes
}

export interface ISeries {
  t: number[];
  inference_tokens_per_s: (number | null)[];
  train_samples_per_s: (number | null)[];
  loss: (number | null)[];
  slack: (number | null)[];
  offload_bytes_per_s: (number | null)[];
}

export interface IJob {
  id: string;
  adapter: string;
  state: JobState;
  error: string | null;
  step: number;
  total_steps: number;
  loss: number | null;
  samples_per_s: number | null;
  eta_s: number | null;
  estimating: boolean; // running, no optimizer step measured yet
  eval_loss?: number | null; // validation loss (val_fraction), the latest
  loss_falling?: boolean | null; // done with the loss still falling: more steps may help
}

export interface IAdapter {
  name: string;
  path: string;
  training: boolean;
  step: number | null;
  r: number | null;
}

export type ExportFormat = 'gguf' | 'vllm';

/** POST adapters/<name>/export: what was written and the shell lines that use it. */
export interface IExport {
  adapter: string;
  format: ExportFormat;
  path: string;
  files: string[];
  commands: string[];
}

/** One WebSocket message of `fineinfer/api/events`. */
export type EventMessage =
  | { type: 'metrics'; data: IMetrics }
  | { type: 'jobs'; data: IJob[] };
