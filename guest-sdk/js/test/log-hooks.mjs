// Module resolution hook: the bare specifier `log` is the host's log
// function inside a component; under Node it is log-stub.mjs.
const stub = new URL('./log-stub.mjs', import.meta.url).href;

export async function resolve(specifier, context, next) {
  if (specifier === 'log') return { url: stub, shortCircuit: true };
  return next(specifier, context);
}
