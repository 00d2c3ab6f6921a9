"""The official `openai` Python client, unmodified, pointed at infergate's proxy: a streamed and
a whole chat, a completion, the model list, embeddings (which the client requests base64-encoded and decodes itself) and, when a
speech model and a recording are given, transcriptions as JSON, text and verbose JSON. Prints
one JSON object with what came back.

    python e2e/clients/openai_client.py URL TOKEN CHAT_MODEL_ID EMBEDDING_MODEL_ID \
        [SPEECH_MODEL_ID RECORDING [TTS_MODEL_ID [IMAGE_MODEL_ID]]]

and, with text-to-speech and text-to-image models, speech as WAV and an image as base64 PNG.
"""

import base64
import json
import sys
import time

import openai


def main():
    url, token, chat_model, embedding_model = sys.argv[1:5]
    result = {}
    chat = openai.OpenAI(base_url=f"{url}/models/{chat_model}/proxy/v1", api_key=token)
    started = time.monotonic()
    arrivals, text = [], ""
    stream = chat.chat.completions.create(
        model="anything",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=48,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text += chunk.choices[0].delta.content
    result["chat"] = {"chunks": len(arrivals), "first_s": arrivals[0], "last_s": arrivals[-1], "text": text}
    whole = chat.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0)
    result["chat_whole"] = {"text": whole.choices[0].message.content,
                            "finish_reason": whole.choices[0].finish_reason,
                            "completion_tokens": whole.usage.completion_tokens}
    completion = chat.completions.create(model="anything", prompt="Once upon", max_tokens=8, temperature=0)
    result["completion"] = {"text": completion.choices[0].text,
                            "completion_tokens": completion.usage.completion_tokens}
    result["models"] = [m.id for m in chat.models.list()]
    embedder = openai.OpenAI(base_url=f"{url}/models/{embedding_model}/proxy/v1", api_key=token)
    embedded = embedder.embeddings.create(model="anything", input=["infergate", "a model gateway"])
    floats = embedder.embeddings.create(model="anything", input=["infergate", "a model gateway"],
                                        encoding_format="float")
    result["embeddings"] = {"count": len(embedded.data), "dims": len(embedded.data[0].embedding),
                            "norm": sum(x * x for x in embedded.data[0].embedding),
                            # JSON carries the shortest decimal of each f32, base64 its bits.
                            "float_vs_base64_max_diff": max(
                                abs(x - y) for a, b in zip(embedded.data, floats.data)
                                for x, y in zip(a.embedding, b.embedding))}
    if len(sys.argv) > 6:
        speech_model, recording = sys.argv[5:7]
        listener = openai.OpenAI(base_url=f"{url}/models/{speech_model}/proxy/v1", api_key=token)
        with open(recording, "rb") as audio:
            text = listener.audio.transcriptions.create(model="whisper-1", file=audio)
        with open(recording, "rb") as audio:
            plain = listener.audio.transcriptions.create(model="whisper-1", file=audio, response_format="text")
        with open(recording, "rb") as audio:
            verbose = listener.audio.transcriptions.create(
                model="whisper-1", file=audio, response_format="verbose_json", language="en")
        result["transcription"] = {"text": text.text, "plain": plain, "duration": verbose.duration,
                                   "segments": len(verbose.segments or []), "language": verbose.language}
    if len(sys.argv) > 7:
        speaker = openai.OpenAI(base_url=f"{url}/models/{sys.argv[7]}/proxy/v1", api_key=token)
        audio = speaker.audio.speech.create(model="tts-1", voice="alloy", input="Hello from infergate",
                                            response_format="wav")
        result["speech"] = {"riff": audio.content[:4] == b"RIFF", "bytes": len(audio.content)}
    if len(sys.argv) > 8:
        painter = openai.OpenAI(base_url=f"{url}/models/{sys.argv[8]}/proxy/v1", api_key=token)
        images = painter.images.generate(model="dall-e-2", prompt="a lighthouse at dusk", size="32x32",
                                         response_format="b64_json")
        png = base64.b64decode(images.data[0].b64_json)
        result["image"] = {"png": png[:8] == b"\x89PNG\r\n\x1a\n", "count": len(images.data)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
