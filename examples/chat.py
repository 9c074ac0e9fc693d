"""A multi-turn chat with the package's chat template, streamed.

    python examples/chat.py
"""

import portable_infer

model = portable_infer.load()
messages = [{"role": "system", "content": "You are a concise assistant."}]
for user in ("Hi! What's a good name for a cat?", "And one for a dog?"):
    messages.append({"role": "user", "content": user})
    print(f"> {user}")
    reply = ""
    for r in model.stream_chat(messages, max_new_tokens=60):
        reply += r.text
        print(r.text, end="", flush=True)
    print()
    messages.append({"role": "assistant", "content": reply})
