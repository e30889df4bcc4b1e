declare module '*.svg' {
  const value: string; // the SVG source, inlined by the JupyterLab builder
  export default value;
}
