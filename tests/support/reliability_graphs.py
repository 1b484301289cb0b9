"""API-format prompts of the reliability tier (tests/reliability): every family of the pack on the fixture
pack's tiny "narrow" SD1.5 (64×64 or 128×64, 1–2 steps), each ending in a SaveImage, plus the prompts
that must fail. :data:`FILES` names the files they load; the tier's conftest writes them."""
from __future__ import annotations

from dataclasses import dataclass

LOADER = {"unet": "narrow", "seed": 0}  # one tiny model for the whole tier: every prompt patches the same modules
POSE_IMAGE = "harry_hermione_thanos.png"  # assets/poses/, copied into the server's input folder
NEGATIVE = "blurry, lowres"
# models/edloras (ED-LoRA tokens) and models/loras (LoRA as Concept trigger words) of the test server
EDLORAS = {"rel_a.pth": ("<a1>", "<a2>"), "rel_b.pth": ("<b1>",), "rel_potter.pth": ("<potter1>", "<potter2>"),
           "rel_hermione.pth": ("<hermione1>", "<hermione2>"), "rel_thanos.pth": ("<thanos1>", "<thanos2>"),
           "cancel_a.pth": ("<c1>", "<c2>"), "cancel_b.pth": ("<d1>",)}
LORAS = {"rel_man.safetensors": "ohwx man", "rel_woman.safetensors": "sks woman"}
CORRUPT_EDLORA = "rel_truncated.pth"  # a real ED-LoRA file cut in half


class Graph(dict):
    """An API-format prompt built node by node; ``add`` returns the new node's id (links are
    ``[id, output slot]``; inputs given as None are left out, as an unconnected optional input)."""

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self) + 1)
        self[node_id] = {"class_type": class_type, "inputs": {k: v for k, v in inputs.items() if v is not None}}
        return node_id


@dataclass
class Prompt:
    """One prompt of the tier: ``key`` says which prompts must give the same image (same kind and
    seed); ``sampler`` is the node that must really run again when the prompt is repeated;
    ``save`` the SaveImage node; ``fusion`` the Gradient Fusion node if there is one."""
    kind: str
    seed: int
    graph: Graph
    sampler: str
    save: str
    fusion: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.kind, self.seed


def base(g: Graph) -> str:
    return g.add("TinySD15Loader", **LOADER)


def edlora(g: Graph, model, clip, name: str, concepts=None, strength: float = 0.7) -> str:
    return g.add("MixOfShowLoadEDLoRA", model=model, clip=clip, edlora_name=name, text_encoder_strength=strength,
                 unet_strength=strength, concepts=concepts)


def lora_concept(g: Graph, model, clip, name: str, concepts=None, strength: float = 1.0) -> str:
    return g.add("MixOfShowLoRAConcept", model=model, clip=clip, lora_name=name, trigger_words=LORAS[name],
                 strength_model=strength, strength_clip=strength, concepts=concepts)


def encode(g: Graph, loader: str, text: str) -> str:
    """Text Encode with Concepts on a loader's (or fusion's) CLIP and concept set."""
    return g.add("MixOfShowTextEncode", clip=[loader, 1], concepts=[loader, 2], text=text)


def negative(g: Graph, clip) -> str:
    return g.add("CLIPTextEncode", clip=clip, text=NEGATIVE)


def box_region(g: Graph, positive: str, negative_: str, box: tuple[int, int, int, int], size: tuple[int, int],
               regions=None, model=None) -> str:
    """A Region on a Box to Mask; ``box`` is (top, left, bottom, right), ``size`` (width, height)."""
    top, left, bottom, right = box
    mask = g.add("MixOfShowBoxMask", width=size[0], height=size[1], top=top, left=left, bottom=bottom, right=right)
    return g.add("MixOfShowRegion", positive=[positive, 0], negative=[negative_, 0], mask=[mask, 0],
                 regions=regions, model=model)


def sample_and_save(g: Graph, kind: str, seed: int, loader: str, model, positive: str, negative_: str,
                    size: tuple[int, int] = (64, 64), steps: int = 2, regions=None,
                    fusion: str | None = None) -> Prompt:
    """KSampler (or the Regional KSampler with ``regions``) → VAE Decode → SaveImage."""
    latent = g.add("EmptyLatentImage", width=size[0], height=size[1], batch_size=1)
    sampler = g.add("MixOfShowRegionalSampler" if regions else "KSampler", model=model, positive=[positive, 0],
                    negative=[negative_, 0], latent_image=[latent, 0], seed=seed, steps=steps, cfg=6.0,
                    sampler_name="euler", scheduler="normal", denoise=1.0, regions=regions)
    decode = g.add("VAEDecode", samples=[sampler, 0], vae=[loader, 2])
    save = g.add("SaveImage", images=[decode, 0], filename_prefix=f"rel_{kind}_{seed}")
    return Prompt(kind, seed, g, sampler, save, fusion)


# --------------------------------------------------------------------------- the soak's kinds


def stock(seed: int) -> Prompt:
    """No node of the pack: the tiny loader, CLIP Text Encode, KSampler, SaveImage."""
    g = Graph()
    b = base(g)
    positive = g.add("CLIPTextEncode", clip=[b, 1], text="a photo of a castle on a hill")
    return sample_and_save(g, "stock", seed, b, [b, 0], positive, negative(g, [b, 1]))


def edlora_chain(seed: int) -> Prompt:
    """Two chained Load ED-LoRA, a prompt with both concepts' layer-wise tokens."""
    g = Graph()
    b = base(g)
    a = edlora(g, [b, 0], [b, 1], "rel_a.pth")
    both = edlora(g, [a, 0], [a, 1], "rel_b.pth", concepts=[a, 2])
    positive = encode(g, both, "a <a1> <a2> and a <b1> in a garden")
    return sample_and_save(g, "edlora_chain", seed, b, [both, 0], positive, negative(g, [both, 1]))


def lora_concept_chain(seed: int) -> Prompt:
    """Two chained LoRA as Concept (kohya and diffusers keys), their trigger words in the prompt."""
    g = Graph()
    b = base(g)
    man = lora_concept(g, [b, 0], [b, 1], "rel_man.safetensors")
    both = lora_concept(g, [man, 0], [man, 1], "rel_woman.safetensors", concepts=[man, 2])
    positive = encode(g, both, "ohwx man and sks woman on a bench")
    return sample_and_save(g, "lora_concept_chain", seed, b, [both, 0], positive, negative(g, [both, 1]))


def fusion(seed: int, cache: bool, names: tuple[str, str] = ("rel_a.pth", "rel_b.pth"), steps: int = 1,
           size: int = 64, kind: str = "fusion") -> Prompt:
    """Gradient Fusion of two ED-LoRAs (strengths 1.0) on the base model; its seed is the sampler's."""
    g = Graph()
    b = base(g)
    first = edlora(g, [b, 0], [b, 1], names[0], strength=1.0)
    both = edlora(g, [first, 0], [first, 1], names[1], concepts=[first, 2], strength=1.0)
    fused = g.add("MixOfShowGradientFusion", model=[b, 0], clip=[b, 1], concepts=[both, 2], steps=steps, width=size,
                  height=size, seed=seed, solver="closed_form", cache=cache)
    tokens = " and a ".join(" ".join(EDLORAS[n]) for n in names)
    positive = encode(g, fused, f"a {tokens} by a lake")
    return sample_and_save(g, kind, seed, b, [fused, 0], positive, negative(g, [fused, 1]), fusion=fused)


WIDE = (128, 64)
LEFT, RIGHT = (0, 0, 64, 64), (0, 64, 64, 128)


def regional_boxes(seed: int) -> Prompt:
    """Two box regions (left, right) with their own concept prompts, the Regional KSampler at 128×64."""
    g = Graph()
    b = base(g)
    a = edlora(g, [b, 0], [b, 1], "rel_a.pth")
    both = edlora(g, [a, 0], [a, 1], "rel_b.pth", concepts=[a, 2])
    neg = negative(g, [both, 1])
    left = box_region(g, encode(g, both, "a <a1> <a2>, smiling"), neg, LEFT, WIDE)
    regions = box_region(g, encode(g, both, "a <b1> in a coat"), neg, RIGHT, WIDE, regions=[left, 0])
    return sample_and_save(g, "regional_boxes", seed, b, [both, 0], encode(g, both, "two people in a park"), neg,
                           WIDE, regions=[regions, 0])


def _per_region(g: Graph, kind: str, seed: int, b: str, loaders: tuple[str, str], prompts: tuple[str, str]) -> Prompt:
    """Each region carries the MODEL of its own loader (its LoRA acts inside that region only); the
    sampling MODEL is the base model ``b``, the global prompt plain CLIP Text Encode on its CLIP."""
    neg = negative(g, [b, 1])
    regions = None
    for loader, text, box in zip(loaders, prompts, (LEFT, RIGHT), strict=True):
        region = box_region(g, encode(g, loader, text), neg, box, WIDE, regions=regions, model=[loader, 0])
        regions = [region, 0]
    positive = g.add("CLIPTextEncode", clip=[b, 1], text="two people in a park")
    return sample_and_save(g, kind, seed, b, [b, 0], positive, neg, WIDE, regions=regions)


def lora_per_region(seed: int) -> Prompt:
    """Two LoRA as Concept loaded side by side on the base, one per region."""
    g = Graph()
    b = base(g)
    man = lora_concept(g, [b, 0], [b, 1], "rel_man.safetensors")
    woman = lora_concept(g, [b, 0], [b, 1], "rel_woman.safetensors")
    return _per_region(g, "lora_per_region", seed, b, (man, woman), ("ohwx man, smiling", "sks woman in a coat"))


def edlora_per_region(seed: int) -> Prompt:
    """Two Load ED-LoRA side by side on the base, one per region."""
    g = Graph()
    b = base(g)
    a = edlora(g, [b, 0], [b, 1], "rel_a.pth")
    other = edlora(g, [b, 0], [b, 1], "rel_b.pth")
    return _per_region(g, "edlora_per_region", seed, b, (a, other), ("a <a1> <a2>, smiling", "a <b1> in a coat"))


def pose_regions(seed: int) -> Prompt:
    """Three chained ED-LoRAs, Regions from Pose on the three-person reference pose (1024×512),
    sampled at 128×64."""
    g = Graph()
    b = base(g)
    loader, concepts = b, None
    for name in ("rel_potter.pth", "rel_hermione.pth", "rel_thanos.pth"):
        loader = edlora(g, [loader, 0], [loader, 1], name, concepts=concepts)
        concepts = [loader, 2]
    image = g.add("LoadImage", image=POSE_IMAGE)
    regions = g.add("MixOfShowPoseRegions", image=[image, 0], clip=[loader, 1], concepts=concepts, margin=0.05,
                    negative=NEGATIVE, prompts="a <potter1> <potter2>, in a robe\na <hermione1> <hermione2>\n"
                                               "a <thanos1> <thanos2>, in armor")
    return sample_and_save(g, "pose_regions", seed, b, [loader, 0], encode(g, loader, "three people in a hall"),
                           negative(g, [loader, 1]), WIDE, regions=[regions, 0])


def regional_guider(seed: int) -> Prompt:
    """The Regional Guider in SamplerCustomAdvanced (random noise, euler, normal schedule, 2 steps)."""
    g = Graph()
    b = base(g)
    a = edlora(g, [b, 0], [b, 1], "rel_a.pth")
    neg = negative(g, [a, 1])
    regions = box_region(g, encode(g, a, "a <a1> <a2> waving"), neg, LEFT, WIDE)
    guider = g.add("MixOfShowRegionalGuider", model=[a, 0], positive=[encode(g, a, "a person on a beach"), 0],
                   negative=[neg, 0], regions=[regions, 0], cfg=6.0)
    noise = g.add("RandomNoise", noise_seed=seed)
    sampler_select = g.add("KSamplerSelect", sampler_name="euler")
    sigmas = g.add("BasicScheduler", model=[a, 0], scheduler="normal", steps=2, denoise=1.0)
    latent = g.add("EmptyLatentImage", width=WIDE[0], height=WIDE[1], batch_size=1)
    sampler = g.add("SamplerCustomAdvanced", noise=[noise, 0], guider=[guider, 0], sampler=[sampler_select, 0],
                    sigmas=[sigmas, 0], latent_image=[latent, 0])
    decode = g.add("VAEDecode", samples=[sampler, 0], vae=[b, 2])
    save = g.add("SaveImage", images=[decode, 0], filename_prefix=f"rel_regional_guider_{seed}")
    return Prompt("regional_guider", seed, g, sampler, save)


def model_state_probe() -> Graph:
    """The fixture pack's ModelStateProbe on the tier's tiny model and CLIP (what is attached to them)."""
    g = Graph()
    b = base(g)
    g.add("ModelStateProbe", model=[b, 0], clip=[b, 1])
    return g


# --------------------------------------------------------------------------- prompts that must fail


@dataclass
class BadPrompt:
    """A prompt the server must refuse (``http_400``) or fail while running (an execution error);
    either way the message must hold every piece of ``says``."""
    name: str
    graph: Graph
    http_400: bool
    says: tuple[str, ...]
    node: str  # the node the error must be reported on


def missing_edlora() -> BadPrompt:
    p = edlora_chain(1)
    p.graph["3"]["inputs"]["edlora_name"] = "no_such_character.pth"
    return BadPrompt("missing ED-LoRA file", p.graph, True, ("no_such_character.pth",), "3")


def missing_lora() -> BadPrompt:
    p = lora_concept_chain(1)
    p.graph["2"]["inputs"]["lora_name"] = "no_such_lora.safetensors"
    return BadPrompt("missing LoRA file", p.graph, True, ("no_such_lora.safetensors",), "2")


def corrupt_edlora() -> BadPrompt:
    p = edlora_chain(1)
    p.graph["3"]["inputs"]["edlora_name"] = CORRUPT_EDLORA
    return BadPrompt("corrupt ED-LoRA file", p.graph, False, (CORRUPT_EDLORA,), "3")


def all_zero_mask() -> BadPrompt:
    """The second region's mask is the stock Solid Mask at 0 (an empty box is already refused by Box
    to Mask): the error must name region 2 (counted from 1, as the editor and the previews count)."""
    p = regional_boxes(1)
    zero = p.graph.add("SolidMask", value=0.0, width=WIDE[0], height=WIDE[1])
    region = [n for n, v in p.graph.items() if v["class_type"] == "MixOfShowRegion"][1]
    p.graph[region]["inputs"]["mask"] = [zero, 0]
    return BadPrompt("all-zero region mask", p.graph, False, ("region 2", "all zero"), region)


def unknown_token() -> BadPrompt:
    p = edlora_chain(1)
    p.graph["4"]["inputs"]["text"] = "a <a1> <a2> and a <zz9>"
    return BadPrompt("unknown concept token", p.graph, False, ("<zz9>",), "4")


BAD_PROMPTS = (missing_edlora, missing_lora, corrupt_edlora, all_zero_mask, unknown_token)
