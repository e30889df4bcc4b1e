// Short human-readable numbers for the sidebar.

// toFixed without "-0.0": a value that rounds to zero is shown as zero.
function fixed(v: number, digits: number): string {
  const s = v.toFixed(digits);
  return Number(s) === 0 ? (0).toFixed(digits) : s;
}

export function fmtNumber(v: number | null | undefined, digits = 1): string {
  return typeof v === 'number' && Number.isFinite(v) ? fixed(v, digits) : '—';
}

export function fmtSeconds(v: number | null | undefined): string {
  if (typeof v !== 'number' || !Number.isFinite(v)) {
    return '—';
  }
  return v < 60 ? `${fixed(v, 1)} s` : `${Math.floor(v / 60)} min ${Math.round(v % 60)} s`;
}

export function fmtBytes(v: number): string {
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (Math.abs(v) >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function fmtCount(v: number): string {
  return v >= 1e9 ? `${(v / 1e9).toFixed(1)} B` : v >= 1e6 ? `${(v / 1e6).toFixed(0)} M` : `${v}`;
}
