// Lets Node run plugin code outside a component, for tests: the world's
// `log` import (`import log from 'log'`) resolves to log-stub.mjs.
//
//   node --import ./test/register.mjs --test test/
import { register } from 'node:module';

register('./log-hooks.mjs', import.meta.url);
