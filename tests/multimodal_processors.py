"""Processors for the tiny multimodal models of tests/test_multimodal.py (a word tokenizer over
their 256 ids, image processors sized to their 32 x 32 images), shared by the transformers and
the vLLM suites: the same prompts and chats reach both engines."""

from __future__ import annotations

IMAGE = 250  # the image placeholder's id in every tiny vocabulary


def word_tokenizer(specials: dict[str, int], **named: str):
    """A word tokenizer: t0 .. t255, and the image tokens `specials` at their ids (as saved and
    read back by vLLM, a word splits before its digits after the first: prompts use t0 .. t9)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    taken = set(specials.values())
    vocabulary = {f"t{i}": i for i in range(256) if i not in taken} | specials
    words = Tokenizer(models.WordLevel(vocabulary, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Found anywhere in a text, spaces or not (Gemma 3's image sequence has none, and newlines).
    words.add_tokens([AddedToken(t, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        unk_token="t0",
        bos_token="t1",
        eos_token="t2",
        pad_token="t0",
        extra_special_tokens=named,
    )


# A chat's parts in order, an image as the family's placeholder (OpenAI's content format).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}PLACEHOLDER "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
)


def llava_processor():
    """CLIP's image processor: a 32 x 32 image in 8 x 8 patches, the class token dropped, is 16
    placeholders."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    return LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=word_tokenizer({"<image>": IMAGE}, image_token="<image>"),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE.replace("PLACEHOLDER", "<image>"),
    )


def pixtral_processor():
    """Pixtral's: 4 x 4 patches merged 2 x 2, 4 placeholders with a row break and an end."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    tokens = {"[IMG]": IMAGE, "[IMG_BREAK]": IMAGE + 1, "[IMG_END]": IMAGE + 2}
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 32}, patch_size=8),
        tokenizer=word_tokenizer(tokens),
        patch_size=8,
        spatial_merge_size=2,
        chat_template=CHAT_TEMPLATE.replace("PLACEHOLDER", "[IMG]"),
    )


def gemma_processor():
    """Gemma 3's: a 32 x 32 image pooled to 4 soft tokens, between a start and an end token and
    newlines (which vLLM's Gemma 3 looks up in the vocabulary, "\n" to "\n\n\n\n")."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    newlines = {"\n" * n: 239 + n for n in range(1, 5)}
    tokens = {"<image_soft_token>": IMAGE, "<start_of_image>": 251, "<end_of_image>": 252}
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=word_tokenizer(
            tokens | newlines,
            image_token="<image_soft_token>",
            boi_token="<start_of_image>",
            eoi_token="<end_of_image>",
        ),
        image_seq_length=4,
        chat_template=CHAT_TEMPLATE.replace("PLACEHOLDER", "<start_of_image>"),
    )


def qwen_processor():
    """Qwen2-VL's: a 32 x 32 image in 4 x 4 patches merged 2 x 2, 16 placeholders between a
    start and an end token."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokens = {"<|image_pad|>": IMAGE, "<|video_pad|>": 251, "<|vision_start|>": 252}
    sizes = dict(
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=word_tokenizer(tokens | {"<|vision_end|>": 253}),
        chat_template=CHAT_TEMPLATE.replace("PLACEHOLDER", QWEN_IMAGE),
    )


QWEN_IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"


# The processor of each family with a tiny model and a processor transformers builds offline.
PROCESSORS = {
    "gemma3": gemma_processor,
    "llava": llava_processor,
    "mistral3": pixtral_processor,
    "qwen2_5_vl": qwen_processor,
}
