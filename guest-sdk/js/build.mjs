#!/usr/bin/env node
// Builds a Rehydra plugin component from a JavaScript module with
// componentize-js (SpiderMonkey, pre-initialised with Wizer).
//
//   node build.mjs ENTRY.js OUT.wasm [--wit DIR] [--world NAME]
//
// ENTRY.js must export `describe`, `initialState`, `apply` and `handle`
// (the rehydra SDK's `aggregate()` gives all four). --world defaults to
// `aggregate`; a process manager (an `aggregate()` given `process`) is built
// with `--world process-manager` and exports `process` too. --wit defaults
// to the `wit/` directory of the repository (or project) this script is in.
//
// Every WASI feature is turned off: the component imports only the world's
// `log` function. So a plugin has no clock, no randomness source, no
// stdio, no network — the SDK routes `console` to `log`, and the host gives
// time and ids in each command's metadata.

import { componentize } from '@bytecodealliance/componentize-js';
import { existsSync } from 'node:fs';
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { dirname, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

function usage(message) {
  console.error(`build.mjs: ${message}`);
  console.error('usage: node build.mjs ENTRY.js OUT.wasm [--wit DIR] [--world NAME]');
  process.exit(2);
}

const positional = [];
let witPath;
let worldName = 'aggregate';
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i += 1) {
  if ((args[i] === '--wit' || args[i] === '--world') && args[i + 1] === undefined) usage(`${args[i]} needs a value`);
  if (args[i] === '--wit') witPath = args[++i];
  else if (args[i] === '--world') worldName = args[++i];
  else if (args[i].startsWith('--')) usage(`unknown option ${args[i]}`);
  else positional.push(args[i]);
}
if (positional.length !== 2) usage('give the entry module and the output file');
const entry = resolve(positional[0]);
const out = resolve(positional[1]);
if (!existsSync(entry)) usage(`${positional[0]} does not exist`);

if (witPath === undefined) {
  // The repository's wit/ (two levels up), or a project's own wit/.
  witPath = [resolve(here, '..', '..', 'wit'), resolve(here, 'wit')].find((p) => existsSync(p));
  if (witPath === undefined) usage('no wit/ directory found: pass --wit DIR');
} else {
  witPath = resolve(witPath);
}

// componentize-js lets the module import files under the working
// directory: work from the deepest directory holding both the entry module
// and this SDK.
function commonAncestor(a, b) {
  const x = a.split(sep);
  const y = b.split(sep);
  let i = 0;
  while (i < x.length && i < y.length && x[i] === y[i]) i += 1;
  return x.slice(0, i).join(sep) || sep;
}
process.chdir(commonAncestor(dirname(entry), here));

const started = Date.now();
let result;
try {
  result = await componentize({
    sourcePath: entry,
    witPath,
    worldName,
    disableFeatures: ['stdio', 'random', 'clocks', 'http', 'fetch-event'],
  });
} catch (e) {
  console.error(`build.mjs: componentize-js failed for ${positional[0]}:\n${e.message ?? e}`);
  process.exit(1);
}
await mkdir(dirname(out), { recursive: true });
// Write beside the target, then rename: a host watching the directory never
// sees half a file.
const tmp = `${out}.tmp${process.pid}`;
await writeFile(tmp, result.component);
await rename(tmp, out);
const mb = (result.component.length / 1e6).toFixed(1);
console.log(`  plugin ${positional[1]} (${mb} MB, built in ${((Date.now() - started) / 1000).toFixed(1)} s)`);
