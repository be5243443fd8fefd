// The SDK's version, as package.json says (test/client.test.ts keeps them in step): a Node registers
// as `lingua-sdk-typescript/<version>` unless given its own `version` (ListNodes shows it).
export const SDK_VERSION = "0.1.0";
