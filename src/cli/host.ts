// `tarmac host`: runs a host in the foreground (wired in src/host, loaded only for this command).
export async function hostCommand(argv: readonly string[]): Promise<number> {
  return (await import('../host/index.ts')).runHost([...argv]);
}
