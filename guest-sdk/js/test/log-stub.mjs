// The host's `log(level, message)` for tests: keeps the messages in
// `globalThis.rehydraLog` so a test can look at them, and says nothing.
globalThis.rehydraLog = [];

export default function log(level, message) {
  globalThis.rehydraLog.push([level, message]);
}
