// Splices freshly measured `## ` sections into an existing results file, so parts of the proxy benchmark can run alone.
/**
 * `report` with each `## ` section of `added` in place of the section of the same heading (up to the next `## `),
 * or appended when it has none; every other section is kept as it was.
 */
export function spliceSections(report: string, added: string): string {
  let out = report;
  for (const section of added.split(/^(?=## )/m).filter((s) => s.startsWith('## '))) {
    const heading = section.slice(0, section.indexOf('\n'));
    const start = out.indexOf(`\n${heading}\n`);
    if (start === -1) {
      out = `${out.trimEnd()}\n\n${section.trimEnd()}\n`;
      continue;
    }
    const next = out.indexOf('\n## ', start + 1);
    out = `${out.slice(0, start + 1)}${section.trimEnd()}\n${next === -1 ? '' : out.slice(next)}`;
  }
  return out;
}
