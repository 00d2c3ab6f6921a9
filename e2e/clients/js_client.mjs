// The npm clients, unmodified, pointed at infergate's proxy: `openai` 6 (embeddings, which it
// asks for base64-encoded and decodes itself, and a streamed chat) and `@huggingface/inference`
// 4 with `endpointUrl: <host>/models/<id>/proxy` and `retry_on_error: false`. Prints one JSON
// object with what came back.
//
//     node e2e/clients/js_client.mjs URL TOKEN '{"embedding": "<id>", ...}' RECORDING
//
// The packages come from package.json beside this file; scripts/setup.sh installs them.

import { readFileSync } from "node:fs";

import { InferenceClient } from "@huggingface/inference";
import OpenAI from "openai";

const [url, token, modelsJson, recording] = process.argv.slice(2);
const models = JSON.parse(modelsJson);
const base = (task) => `${url}/models/${models[task]}/proxy`;
const result = {};

const embedder = new OpenAI({ baseURL: `${base("embedding")}/v1`, apiKey: token, maxRetries: 0 });
const embedded = await embedder.embeddings.create({
  model: "anything",
  input: ["infergate", "a model gateway"],
});
const first = embedded.data[0].embedding;
result.embeddings = {
  count: embedded.data.length,
  dims: first.length,
  norm: first.reduce((sum, x) => sum + x * x, 0),
};

const chat = new OpenAI({ baseURL: `${base("text-generation")}/v1`, apiKey: token, maxRetries: 0 });
const stream = await chat.chat.completions.create({
  model: "anything",
  messages: [{ role: "user", content: "Hello!" }],
  max_tokens: 16,
  stream: true,
});
let chunks = 0;
let text = "";
for await (const chunk of stream) {
  const content = chunk.choices[0]?.delta?.content;
  if (content) {
    chunks += 1;
    text += content;
  }
}
result.chat = { chunks, text };

const hf = (task) => new InferenceClient(token, { endpointUrl: base(task) });
const options = { retry_on_error: false };
const vector = await hf("embedding").featureExtraction({ inputs: "infergate" }, options);
result.feature_extraction = Array.isArray(vector[0]) ? [vector.length, vector[0].length] : [vector.length];
const labels = await hf("text-classification").textClassification({ inputs: "I love this product" }, options);
result.text_classification = labels.length;
const translated = await hf("translation").translation({ inputs: "Hello, world" }, options);
result.translation = translated.translation_text;
// Text generation goes to `<endpointUrl>/v1/completions` (OpenAI's shape) in this version, not
// to the endpoint root; the stream yields the completion chunks as they come.
const generated = await hf("text-generation").textGeneration(
  { inputs: "Once upon", parameters: { max_new_tokens: 8 } },
  options,
);
result.text_generation = generated.generated_text;
let pieces = 0;
for await (const output of hf("text-generation").textGenerationStream(
  { inputs: "Once upon", parameters: { max_new_tokens: 8 } },
  options,
)) {
  if (output.token?.text ?? output.choices?.[0]?.text) pieces += 1;
}
result.text_generation_stream = pieces;
let chatChunks = 0;
for await (const chunk of hf("text-generation").chatCompletionStream(
  { messages: [{ role: "user", content: "Hello!" }], max_tokens: 8 },
  options,
)) {
  if (chunk.choices?.[0]?.delta?.content) chatChunks += 1;
}
result.chat_completion_stream = chatChunks;
const heard = await hf("speech-recognition").automaticSpeechRecognition(
  { data: new Blob([readFileSync(recording)], { type: "audio/wav" }) },
  options,
);
result.automatic_speech_recognition = heard.text;
const image = await hf("text-to-image").textToImage(
  { inputs: "a lighthouse at dusk", parameters: { num_inference_steps: 2, width: 32, height: 32 } },
  { ...options, outputType: "blob" },
);
result.text_to_image = { type: image.type, bytes: image.size };
const speech = await hf("text-to-speech").textToSpeech({ inputs: "Hello from infergate" }, options);
result.text_to_speech = { type: speech.type, bytes: speech.size };
console.log(JSON.stringify(result));
