import * as React from 'react';

const WIDTH = 240;
const HEIGHT = 40;

export interface IChartProps {
  testid: string;
  title: string;
  t: number[]; // seconds, ascending
  values: (number | null)[]; // null = no value (drawn as a gap)
  windowS: number; // seconds shown, ending at the last t
  format: (v: number) => string;
  zero?: boolean; // start the y axis at 0 (default) or at the minimum
}

/** A small line chart drawn as one SVG path; no axes, current value and maximum in the title. */
export function Chart(props: IChartProps): JSX.Element {
  const { t, values, windowS, format, zero = true } = props;
  const end = t.length ? t[t.length - 1] : 0;
  const points: [number, number | null][] = t.map((ti, i) => [ti, finite(values[i])]);
  const shown = points.filter(([ti, v]) => ti >= end - windowS && v !== null);
  const ys = shown.map(([, v]) => v as number);
  const hi = ys.length ? Math.max(...ys) : 0;
  const lo = zero || !ys.length ? 0 : Math.min(...ys);
  const span = hi - lo || 1;
  const last = ys.length ? ys[ys.length - 1] : null;

  let d = '';
  let pen = 'M';
  for (const [ti, v] of points) {
    if (ti < end - windowS || v === null) {
      pen = 'M'; // a gap
      continue;
    }
    const x = WIDTH - ((end - ti) / windowS) * WIDTH;
    const y = HEIGHT - 2 - ((v - lo) / span) * (HEIGHT - 4);
    d += `${pen}${x.toFixed(1)},${y.toFixed(1)}`;
    pen = 'L';
  }

  return (
    <div className="fi-Chart" data-testid={props.testid}>
      <div className="fi-Chart-title">
        <span>{props.title}</span>
        <span className="fi-Chart-value" data-testid={`${props.testid}-value`}>
          {last === null ? '—' : format(last)}
          {ys.length > 1 && <span className="fi-Chart-max"> (max {format(hi)})</span>}
        </span>
      </div>
      <svg
        className="fi-Chart-plot"
        viewBox={`0 0 ${WIDTH} ${HEIGHT}`}
        preserveAspectRatio="none"
        role="img"
        aria-label={props.title}
      >
        <path className="fi-Chart-line" d={d} vectorEffect="non-scaling-stroke" />
      </svg>
    </div>
  );
}

function finite(v: number | null | undefined): number | null {
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}
