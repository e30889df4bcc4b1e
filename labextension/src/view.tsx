import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import * as React from 'react';

import { Chart } from './chart';
import { fmtBytes, fmtCount, fmtNumber, fmtSeconds } from './format';
import { FineInferModel, SeriesKey } from './model';
import { ExportFormat, IAdapter, IJob, IPrefixCache, IStatus } from './types';

const CHARTS: { key: SeriesKey; title: string; format: (v: number) => string; zero?: boolean }[] = [
  { key: 'inference_tokens_per_s', title: 'Inference tokens/s', format: v => fmtNumber(v) },
  { key: 'train_samples_per_s', title: 'Training samples/s', format: v => fmtNumber(v, 2) },
  { key: 'loss', title: 'Loss', format: v => fmtNumber(v, 3), zero: false },
  { key: 'slack', title: 'Deferral slack', format: fmtSeconds },
  { key: 'offload_bytes_per_s', title: 'Offload', format: v => `${fmtBytes(v)}/s` }
];

/** "cpu · float32 · nf4 · 135M params · 91 MB": quantization and weight bytes when known. */
function modelLine(info: NonNullable<IStatus['model']>): string {
  const quant = info.quantize && info.quantize !== 'none' ? ` · ${info.quantize}` : '';
  const bytes = info.weight_bytes ? ` · ${fmtBytes(info.weight_bytes)}` : '';
  return `${info.device} · ${info.dtype}${quant} · ${fmtCount(info.parameters)} params${bytes}`;
}

function offloadTitle(model: FineInferModel): string {
  const o = model.metrics?.offload;
  const where = o?.mode === 'disk' ? 'disk' : 'host memory';
  return `Offload from ${where} (${o?.layers ?? 0} layers; ${fmtBytes(o?.shared_bytes ?? 0)} shared)`;
}

/** The left sidebar panel: draws the model and nothing else. */
export class FineInferPanel extends ReactWidget {
  constructor(private readonly _model: FineInferModel) {
    super();
    this.addClass('fi-Panel');
  }

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    this._model.active = this.isVisible;
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._model.active = true;
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this._model.active = false;
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this._model.changed}>{() => <Dashboard model={this._model} />}</UseSignal>
    );
  }
}

function Dashboard({ model }: { model: FineInferModel }): JSX.Element {
  const up = model.status !== null && model.connection !== 'unreachable';
  return (
    <div className="fi-Dashboard">
      <h2 className="fi-Title">FineInfer</h2>
      <Engine model={model} />
      {up && <Activity model={model} />}
      {up && (
        <Section title="Last 5 minutes">
          {CHARTS.map(c =>
            c.key === 'offload_bytes_per_s' && !model.metrics?.offload?.enabled ? (
              <div key={c.key} className="fi-Detail" data-testid="fi-offload-off">
                Offload: none, every layer on the device
              </div>
            ) : (
              <Chart
                key={c.key}
                testid={`fi-chart-${c.key}`}
                title={c.key === 'offload_bytes_per_s' ? offloadTitle(model) : c.title}
                t={model.history.t}
                values={model.history[c.key]}
                windowS={300}
                format={c.format}
                zero={c.zero}
              />
            )
          )}
          <div className="fi-Detail" data-testid="fi-prefix-cache">
            {prefixText(model.metrics?.prefix_cache)}
          </div>
        </Section>
      )}
      {up && <Jobs model={model} />}
      {up && <Adapters model={model} />}
    </div>
  );
}

function prefixText(p: IPrefixCache | undefined): string {
  if (!p?.budget_bytes) {
    return 'Prefix cache: off';
  }
  const rate = p.hit_rate === null ? '–' : `${Math.round(100 * p.hit_rate)}%`;
  return (
    `Prefix cache: ${fmtBytes(p.bytes)} of ${fmtBytes(p.budget_bytes)} · hit rate ${rate}` +
    ` · ${fmtCount(p.tokens_saved)} tokens saved`
  );
}

function Engine({ model }: { model: FineInferModel }): JSX.Element {
  const { status, connection } = model;
  const info = status?.model;
  const lacking = Object.entries(status?.features?.lacking ?? {});
  let state: string = connection === 'unreachable' ? 'unreachable' : status?.state ?? 'connecting';
  let text = state;
  let detail = '';
  if (state === 'connecting') {
    text = 'connecting…';
  } else if (state === 'unreachable') {
    text = 'server not reachable';
    detail = `${model.unreachableReason}. Retrying every 2 s.`;
  } else if (state === 'loading') {
    detail = status?.progress ?? '';
  } else if (state === 'error') {
    detail = status?.error ?? '';
  }
  if (!['connecting', 'unreachable', 'loading', 'ready', 'error'].includes(state)) {
    state = 'error';
  }
  return (
    <Section title="Engine">
      <dl className="fi-Fields">
        <dt>Model</dt>
        <dd data-testid="fi-model-name" title={info?.path}>
          {info?.name ?? '—'}
        </dd>
        <dt>Device</dt>
        <dd data-testid="fi-device" title={info?.dtype_reason}>
          {info ? modelLine(info) : '—'}
        </dd>
        {lacking.length > 0 && (
          <>
            <dt>Lacks</dt>
            <dd data-testid="fi-lacking" title={lacking.map(([f, why]) => `${f}: ${why}`).join('\n')}>
              {lacking.map(([f]) => f.replace(/_/g, ' ')).join(', ')}
            </dd>
          </>
        )}
        <dt>State</dt>
        <dd>
          <span className={`fi-State fi-mod-${state}`} data-testid="fi-state" data-state={state}>
            {text}
          </span>
          {connection !== 'unreachable' && connection !== 'connecting' && (
            <span className="fi-Connection" data-testid="fi-connection" title="how the sidebar hears from the server">
              {connection === 'live' ? 'live' : 'polling'}
            </span>
          )}
        </dd>
      </dl>
      {detail && (
        <div className={`fi-Detail fi-mod-${state}`} data-testid="fi-state-detail">
          {detail}
        </div>
      )}
    </Section>
  );
}

function Activity({ model }: { model: FineInferModel }): JSX.Element {
  const m = model.metrics;
  return (
    <Section title="Now">
      <dl className="fi-Fields">
        <dt>Step</dt>
        <dd data-testid="fi-step-kind" data-kind={m?.iteration.kind}>
          {m?.iteration.kind ?? '—'}
        </dd>
        <dt>Requests</dt>
        <dd>
          <span data-testid="fi-requests-waiting">{m?.requests.waiting ?? '—'}</span> waiting,{' '}
          <span data-testid="fi-requests-running">{m?.requests.running ?? '—'}</span> running
        </dd>
        <dt>Slack</dt>
        <dd data-testid="fi-slack" title="how long the most urgent request can still be deferred">
          {fmtSeconds(m?.slack.min)}
        </dd>
        <dt>Policy</dt>
        <dd data-testid="fi-policy">{model.status?.policy ?? '—'}</dd>
      </dl>
    </Section>
  );
}

function Jobs({ model }: { model: FineInferModel }): JSX.Element {
  return (
    <Section title="Training jobs">
      {model.actionError && (
        <div className="fi-Detail fi-mod-error" data-testid="fi-action-error">
          {model.actionError}
        </div>
      )}
      {model.jobs.length === 0 && <div className="fi-Empty">No training jobs.</div>}
      <ul className="fi-Jobs" data-testid="fi-jobs">
        {model.jobs.map(job => (
          <Job key={job.id} job={job} model={model} />
        ))}
      </ul>
    </Section>
  );
}

function Job({ job, model }: { job: IJob; model: FineInferModel }): JSX.Element {
  const fraction = job.total_steps > 0 ? Math.min(job.step / job.total_steps, 1) : 0;
  const canStop = job.state === 'queued' || job.state === 'running';
  const canResume = ['stopped', 'failed', 'interrupted'].includes(job.state); // docs/api.md: resume
  return (
    <li className={`fi-Job fi-mod-${job.state}`} data-testid={`fi-job-${job.id}`} data-state={job.state}>
      <div className="fi-Job-head">
        <span className="fi-Job-adapter" title={job.adapter}>
          {job.adapter}
        </span>
        <span className="fi-Job-id">{job.id}</span>
        <span className={`fi-Badge fi-mod-${job.state}`} data-testid="fi-job-state">
          {job.state}
        </span>
      </div>
      <div
        className="fi-Progress"
        role="progressbar"
        aria-valuemin={0}
        aria-valuemax={job.total_steps}
        aria-valuenow={job.step}
        data-testid="fi-job-progress"
      >
        <div className="fi-Progress-bar" style={{ width: `${(fraction * 100).toFixed(1)}%` }} />
      </div>
      <div className="fi-Job-stats">
        <span data-testid="fi-job-step">
          {job.step} / {job.total_steps}
        </span>
        <span>
          loss <span data-testid="fi-job-loss">{fmtNumber(job.loss, 3)}</span>
        </span>
        {job.eval_loss !== null && job.eval_loss !== undefined && (
          <span>
            val loss <span data-testid="fi-job-eval-loss">{fmtNumber(job.eval_loss, 3)}</span>
          </span>
        )}
        {job.state === 'running' && (
          <span>{job.estimating ? 'estimating eta' : `eta ${fmtSeconds(job.eta_s)}`}</span>
        )}
      </div>
      {job.loss_falling && (
        <div className="fi-Detail" data-testid="fi-job-falling">
          loss still falling: more steps may help
        </div>
      )}
      {job.error && (
        <div className="fi-Detail fi-mod-error" data-testid="fi-job-error">
          {job.error}
        </div>
      )}
      <div className="fi-Job-actions">
        <button
          className="fi-Button"
          data-testid="fi-job-stop"
          disabled={!canStop}
          onClick={() => void model.stopJob(job.id)}
        >
          Stop
        </button>
        <button
          className="fi-Button"
          data-testid="fi-job-resume"
          disabled={!canResume}
          onClick={() => void model.resumeJob(job.id)}
        >
          Resume
        </button>
      </div>
    </li>
  );
}

function Adapters({ model }: { model: FineInferModel }): JSX.Element {
  return (
    <Section title="Adapters">
      {model.adapters.length === 0 && <div className="fi-Empty">No adapters loaded.</div>}
      <ul className="fi-Adapters" data-testid="fi-adapters">
        {model.adapters.map(a => (
          <Adapter key={a.name} adapter={a} model={model} />
        ))}
      </ul>
    </Section>
  );
}

const EXPORTS: { to: ExportFormat; label: string; title: string }[] = [
  { to: 'gguf', label: 'llama.cpp / Ollama', title: 'a LoRA .gguf (llama.cpp, Ollama, LM Studio)' },
  { to: 'vllm', label: 'vLLM', title: "a PEFT folder, checked against vLLM's LoRA loader" }
];

function Adapter({ adapter, model }: { adapter: IAdapter; model: FineInferModel }): JSX.Element {
  const [choosing, setChoosing] = React.useState(false);
  const done = model.exports[adapter.name];
  const exportTo = (to: ExportFormat) => {
    setChoosing(false);
    void model.exportAdapter(adapter.name, to);
  };
  return (
    <li className="fi-Adapter" data-testid={`fi-adapter-${adapter.name}`}>
      <div className="fi-Adapter-head">
        <span className="fi-Adapter-name" title={adapter.name}>
          {adapter.name}
        </span>
        <span className="fi-Adapter-info">
          {adapter.r !== null && `r=${adapter.r}`}
          {adapter.step !== null && ` · step ${adapter.step}`}
        </span>
        {adapter.training && <span className="fi-Badge fi-mod-running">training</span>}
        <button
          className="fi-Button"
          data-testid="fi-adapter-export"
          aria-expanded={choosing}
          disabled={done?.busy}
          onClick={() => setChoosing(!choosing)}
        >
          Export
        </button>
      </div>
      {choosing && (
        <div className="fi-Export-choices">
          {EXPORTS.map(e => (
            <button
              key={e.to}
              className="fi-Button"
              data-testid={`fi-export-${e.to}`}
              title={e.title}
              onClick={() => exportTo(e.to)}
            >
              {e.label}
            </button>
          ))}
        </div>
      )}
      {done?.busy && <div className="fi-Detail">Exporting…</div>}
      {done?.error && (
        <div className="fi-Detail fi-mod-error" data-testid="fi-export-error">
          {done.error}
        </div>
      )}
      {done?.result && (
        <div className="fi-Detail fi-Export" data-testid="fi-export-result" data-format={done.to}>
          <div data-testid="fi-export-path">{done.result.path}</div>
          <pre className="fi-Export-commands" data-testid="fi-export-commands">
            {done.result.commands.join('\n')}
          </pre>
        </div>
      )}
    </li>
  );
}

function Section(props: { title: string; children: React.ReactNode }): JSX.Element {
  return (
    <section className="fi-Section">
      <h3 className="fi-Section-title">{props.title}</h3>
      {props.children}
    </section>
  );
}
