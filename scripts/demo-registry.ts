// `npm run demo-registry`: a local registry on 127.0.0.1:5000 holding a tiny web image, for the README's quick start.
import { startRegistry } from '../test/helpers/registry.ts';
import { buildAndPushImage } from '../test/helpers/images.ts';

const port = Number(process.env['PORT'] ?? 5000);
const registry = await startRegistry({ port });
const page = '<h1>Hello from Tarmac</h1>\n';
const ref = await buildAndPushImage(registry.host, 'hello', {
  files: { 'var/www/hello.html': page },
  cmd: ['sh', '-c', 'echo "machine $FLY_MACHINE_ID of $FLY_APP_NAME serving on :8080"; (cat /var/www/hello.html; echo "<p>machine $(hostname) in $FLY_REGION</p>") > /var/www/index.html; exec httpd -f -p 8080 -h /var/www'],
});
process.stdout.write(`Registry on http://${registry.host} with the image ${ref} (busybox httpd on port 8080).\n\nTry:\n` +
  `  npx tarmac apps create hello\n  npx tarmac machine run ${ref} -a hello --port 80:8080/tcp:http\n  curl http://hello.localhost:8080/\n\nCtrl-C stops the registry.\n`);
await new Promise<void>((resolve) => { process.once('SIGINT', resolve); process.once('SIGTERM', resolve); });
await registry.stop();
