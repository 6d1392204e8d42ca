"""Build data/sample/ecinstruct_sample.jsonl: real ECInstruct rows plus hand-written rows (README.md here).

    python data/sample/build_sample.py --shared ../shared/ecinstruct [--out data/sample/ecinstruct_sample.jsonl]

`--shared` is the folder of real ECInstruct rows (test_rows_dev.jsonl, ave_train_100.jsonl,
ecinstruct_instructions.json, qpr_label.json). Real rows are copied verbatim except `split`, which
is relabelled for some of them (the shared folder has test rows only for MPC/PM/PSI/PRP and train
rows only for AVE). Rows of SA, SR, AP, AG and QPR are written here by hand in the formats of
ECInstruct's data-building notebooks. The output is deterministic.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from outdir import read_jsonl  # noqa: E402

DIVERSE, SINGLE = "IND_Diverse_Instruction", "IND_Single_Instruction"
ONE_SHOT = "IND_Diverse_Instruction_1-shot"

# ---- real rows: which items of each block go to which split --------------------------------------
# Test rows keep their place in the hub test block (items 0..n-1), so their "index" matches the
# gold files; train/val rows are relabelled test items taken from further down the block.
REAL_TEST_PLAN = {  # task: (test items, train items, val items) of the IND_Diverse test block
    "Multiclass_Product_Classification": (range(0, 12), range(300, 340), range(600, 606)),
    "Product_Substitute_Identification": (range(0, 12), range(300, 340), range(600, 606)),
    "Product_Relation_Prediction": (range(0, 12), range(300, 340), range(600, 606)),
    "Product_Matching": (range(0, 12), range(100, 140), range(160, 166)),
}
PRP_OOD_TEST = range(0, 10)          # OOD_Diverse_Instruction test items, verbatim
AVE_PLAN = (range(0, 35), range(35, 41), range(41, 51))   # IND_Diverse train rows -> train, val, test
AVE_SINGLE_TRAIN = range(0, 10)      # IND_Single_Instruction train rows, verbatim

# ---- hand-written rows -----------------------------------------------------------------------------
SA_OPTIONS = ["A: very positive", "B: positive", "C: neutral", "D: negative", "E: very negative"]
SA_REVIEWS = [  # (stars, review text)
    (5, "Absolutely love this blender. It crushes ice in seconds and cleaning it takes less than a minute."),
    (4, "Good headphones for the price. The bass is a little heavy but the battery easily lasts a full week."),
    (3, "The tent is fine for summer camping, nothing special. The poles feel flimsy but it kept us dry."),
    (2, "The charger works but gets very hot after twenty minutes and the cable started fraying within a month."),
    (1, "Broke on the second day. The handle snapped off the pan while I was cooking eggs. Total waste of money."),
    (5, "Best yoga mat I have owned. Thick, grippy, no chemical smell, and it rolls up tight for my commute."),
    (4, "Keyboard feels solid and the keys are quiet. Took off one star because the backlight is uneven."),
    (3, "It does what it says. The coffee is hot and drinkable, but it takes a long time to brew a full pot."),
    (2, "Sizing runs very small and the fabric pills after one wash. I expected better from this brand."),
    (1, "Arrived with a cracked screen and the seller never answered my messages. Do not buy from them."),
    (5, "My kids use this bike helmet every day. Fits perfectly, easy to adjust, and it survived a real fall."),
    (4, "Sharp knives that hold an edge well. The block takes up more counter space than I would like."),
    (3, "Average speaker. Loud enough for a small room, but the bluetooth connection drops now and then."),
    (2, "The water bottle leaks from the lid unless you screw it extremely tight, which makes it hard to open."),
    (1, "Stopped charging after a week and the replacement did the same thing. Customer support was useless."),
    (5, "Fantastic camping stove. Boils water in under three minutes and packs down smaller than my mug."),
    (4, "Comfortable running shoes with good cushioning. They needed a few runs to break in around the heel."),
    (3, "The vacuum picks up crumbs fine but struggles with pet hair on carpet. Battery life is just okay."),
    (2, "The lamp looks nice in photos but the switch is cheap and the shade arrived dented in the box."),
    (1, "This mouse double clicks on its own after a few days of use. Returned it and bought another brand."),
    (5, "Great cast iron skillet. Came well seasoned, heats evenly, and my cornbread slides right out."),
    (4, "Solid fitness tracker. Sleep tracking is accurate and the app is simple, though the strap is stiff."),
]

# Sequential recommendation: item text "Title. Category. Subcategory. Brand." (the notebook joins
# cleaned title, two categories and brand, each ending with ".").
SR_CATALOG = {
    "kitchen": [
        "Lodge 10.25 Inch Cast Iron Skillet. Home & Kitchen. Cookware. Lodge.",
        "OXO Good Grips Silicone Spatula Set. Home & Kitchen. Kitchen Utensils. OXO.",
        "Pyrex Glass Measuring Cup Set, 3 Piece. Home & Kitchen. Bakeware. Pyrex.",
        "Chef'n Garlic Zoom Garlic Chopper. Home & Kitchen. Kitchen Utensils. Chef'n.",
        "Nordic Ware Natural Aluminum Half Sheet Pan. Home & Kitchen. Bakeware. Nordic Ware.",
        "Victorinox Fibrox Pro 8 Inch Chef's Knife. Home & Kitchen. Cutlery. Victorinox.",
        "John Boos Maple Wood Cutting Board. Home & Kitchen. Kitchen Utensils. John Boos.",
        "Lodge Silicone Hot Handle Holder, Red. Home & Kitchen. Cookware Accessories. Lodge.",
        "KitchenAid Classic Oven Mitts, Set of 2. Home & Kitchen. Kitchen Linens. KitchenAid.",
        "Bialetti Moka Express Stovetop Espresso Maker. Home & Kitchen. Coffee Makers. Bialetti.",
    ],
    "outdoors": [
        "Coleman Sundome 4 Person Camping Tent. Sports & Outdoors. Tents. Coleman.",
        "Teton Sports Celsius Sleeping Bag. Sports & Outdoors. Sleeping Bags. Teton Sports.",
        "Black Diamond Spot 350 Headlamp. Sports & Outdoors. Lighting. Black Diamond.",
        "MSR PocketRocket 2 Backpacking Stove. Sports & Outdoors. Camp Kitchen. MSR.",
        "Sawyer Products Mini Water Filtration System. Sports & Outdoors. Hydration. Sawyer.",
        "Therm-a-Rest Z Lite Sol Sleeping Pad. Sports & Outdoors. Sleeping Pads. Therm-a-Rest.",
        "GSI Outdoors Pinnacle Camper Cookset. Sports & Outdoors. Camp Kitchen. GSI Outdoors.",
        "Nalgene Tritan Wide Mouth Water Bottle, 32 oz. Sports & Outdoors. Hydration. Nalgene.",
        "Osprey Talon 22 Hiking Daypack. Sports & Outdoors. Backpacks. Osprey.",
        "Black Diamond Trail Trekking Poles. Sports & Outdoors. Hiking Poles. Black Diamond.",
    ],
    "electronics": [
        "Anker PowerCore 10000 Portable Charger. Electronics. Power Banks. Anker.",
        "Logitech M720 Triathlon Wireless Mouse. Electronics. Computer Accessories. Logitech.",
        "SanDisk 128GB Ultra microSDXC Card. Electronics. Memory Cards. SanDisk.",
        "Sony WH-CH710N Noise Cancelling Headphones. Electronics. Headphones. Sony.",
        "Anker USB C to USB C Cable, 6 ft. Electronics. Cables. Anker.",
        "Logitech K380 Multi-Device Bluetooth Keyboard. Electronics. Computer Accessories. Logitech.",
        "JBL Flip 5 Waterproof Portable Bluetooth Speaker. Electronics. Speakers. JBL.",
        "TP-Link AC1200 WiFi Range Extender. Electronics. Networking. TP-Link.",
        "Samsung T7 Portable SSD 1TB. Electronics. External Drives. Samsung.",
        "Amazon Basics Laptop Sleeve, 15.6 Inch. Electronics. Laptop Bags. Amazon Basics.",
    ],
    "fitness": [
        "Gaiam Essentials Thick Yoga Mat. Sports & Outdoors. Yoga. Gaiam.",
        "Fit Simplify Resistance Loop Exercise Bands. Sports & Outdoors. Strength Training. Fit Simplify.",
        "Amazon Basics Neoprene Dumbbell Hand Weights. Sports & Outdoors. Strength Training. Amazon Basics.",
        "TriggerPoint GRID Foam Roller. Sports & Outdoors. Recovery. TriggerPoint.",
        "Gaiam Yoga Block, 2 Pack. Sports & Outdoors. Yoga. Gaiam.",
        "WOD Nation Speed Jump Rope. Sports & Outdoors. Cardio Training. WOD Nation.",
        "Fitbit Inspire 2 Health and Fitness Tracker. Sports & Outdoors. Activity Trackers. Fitbit.",
        "BalanceFrom GoYoga Mat Carrying Strap. Sports & Outdoors. Yoga. BalanceFrom.",
        "Perfect Fitness Ab Carver Pro Roller. Sports & Outdoors. Core Training. Perfect Fitness.",
        "Hydro Flask Wide Mouth Bottle, 32 oz. Sports & Outdoors. Hydration. Hydro Flask.",
    ],
}

# Product QA (AP and AG): a question, review snippets, whether they answer it, and the answer.
QA_ITEMS = [
    ("Is this pan safe to use on an induction cooktop?",
     ["I use it on my induction range every day and it heats up fast.", "Heavy, but it holds heat really well.",
      "Cleanup is easy if you do not let food sit."], True, "Yes, it works on induction cooktops."),
    ("How long does the battery last on a full charge?",
     ["The battery gets me through about 30 hours of listening.", "Comfortable even with glasses.",
      "Noise cancelling is decent for the price."], True, "About 30 hours of playback."),
    ("Does the tent come with a footprint?",
     ["Setup took ten minutes with two people.", "Stayed dry in a heavy storm.",
      "The rain fly is a little short on the sides."], False, ""),
    ("Can this mat be used for hot yoga?",
     ["I sweat a lot in hot yoga and this mat still grips well.", "It is thick enough for my knees.",
      "No smell after unpacking."], True, "Yes, it keeps its grip when wet from sweat in hot yoga."),
    ("Is the keyboard compatible with an iPad?",
     ["Pairs with my iPad and my Windows laptop and switches between them instantly.",
      "The keys are a bit small.", "Battery lasted months."], True, "Yes, it pairs with iPads over Bluetooth."),
    ("What is the warranty period?",
     ["Works great so far.", "Sound is clear at high volume.", "The strap could be longer."], False, ""),
    ("Does this filter remove viruses?",
     ["It filters bacteria and protozoa but the manual says it does not remove viruses.",
      "Flow rate slows down until you backflush it.", "Very light for backpacking."],
     True, "No, it removes bacteria and protozoa but not viruses."),
    ("Will this fit a 17 inch laptop?",
     ["Fits my 15 inch laptop snugly.", "Nice padding on all sides.", "The zipper feels cheap."], False, ""),
    ("Is the knife dishwasher safe?",
     ["The manufacturer recommends hand washing to keep the edge.", "Super sharp out of the box.",
      "The handle is comfortable even when wet."], True, "It is best washed by hand to keep the edge sharp."),
    ("How many cups of coffee does it make?",
     ["Makes six small espresso cups per brew.", "Takes about five minutes on my gas stove.",
      "Do not put it in the dishwasher."], True, "Six espresso-sized cups."),
    ("Does the speaker float in water?",
     ["Survived a drop in the pool.", "Bass is strong for the size.", "Charges over USB C."], False, ""),
    ("Can you replace the tips on the trekking poles?",
     ["Replacement carbide tips are sold separately and screw right on.", "They collapse small enough for my pack.",
      "The straps are comfortable."], True, "Yes, the carbide tips can be replaced with ones sold separately."),
    ("Is the sleeping bag machine washable?",
     ["Warm down to about 40 degrees.", "Packs into a large stuff sack.", "Zipper snags sometimes."], False, ""),
    ("Does the charger support fast charging for phones?",
     ["Charges my phone at full speed with the included cable.", "Small enough for a pocket.",
      "Takes a few hours to recharge itself."], True, "Yes, it fast-charges phones with the included cable."),
    ("How heavy is the stove?",
     ["It weighs about 73 grams, lighter than my phone.", "Boils water very quickly.",
      "The pot supports fold in neatly."], True, "About 73 grams."),
    ("Does the foam roller come with an exercise guide?",
     ["Firm enough for deep tissue work.", "The hollow core makes it light.", "My legs feel better after runs."],
     False, ""),
    ("Is the cutting board reversible?",
     ["Both sides are usable and I keep one side for meat.", "It needs oiling once a month.",
      "Very heavy and does not slide."], True, "Yes, both sides can be used."),
    ("Can the mouse connect to three computers?",
     ["I switch between three computers with the button on top.", "Battery lasts a long time.",
      "The scroll wheel is smooth."], True, "Yes, it switches between three devices."),
    ("Is the jump rope length adjustable?",
     ["Bearings spin smoothly.", "Good for double unders.", "Handles feel solid."], False, ""),
    ("Does the headlamp have a red light mode?",
     ["The red mode keeps my night vision at camp.", "Bright enough for trail running.",
      "Runs on three AAA batteries."], True, "Yes, it has a red light mode."),
    ("What size SD adapter comes with the card?",
     ["Fast transfer speeds for 4K video.", "Works in my drone.", "Good price for the capacity."], False, ""),
    ("Is the water bottle insulated?",
     ["Ice lasts all day in the car, the double wall insulation works.", "Fits in my cup holder.",
      "The lid is easy to carry."], True, "Yes, it is double-wall insulated and keeps ice all day."),
]

# Query-product ranking: a query and candidate titles with their ESCI label.
QPR_ITEMS = [  # the first six follow qpr_label.json items 0-5 (test items keep their hub index)
    ("usb c charger for laptop", [("E", "Anker 65W USB C Charger for MacBook and Laptops"),
                                  ("S", "65W Laptop Charger with Barrel Connector for HP and Dell")]),
    ("stainless steel water bottle", [("E", "Hydro Flask Stainless Steel Wide Mouth Water Bottle 32 oz"),
                                      ("S", "Nalgene Tritan BPA Free Plastic Water Bottle 32 oz")]),
    ("yoga mat thick", [("C", "Gaiam Yoga Block 2 Pack, Supportive Foam Blocks"),
                        ("S", "Amazon Basics 1/2 Inch Extra Thick Exercise Mat"),
                        ("E", "Gaiam Essentials Thick Yoga Mat with Carrier Strap, 10mm")]),
    ("wireless mouse for mac", [("S", "Logitech Wireless Mouse M185, USB Receiver"),
                                ("E", "Logitech MX Anywhere 3 Wireless Mouse for Mac, Bluetooth"),
                                ("C", "Mouse Pad with Wrist Rest, Ergonomic Memory Foam")]),
    ("cast iron skillet 12 inch", [("E", "Lodge 12 Inch Cast Iron Skillet, Pre-Seasoned"),
                                   ("S", "Lodge 10.25 Inch Cast Iron Skillet, Pre-Seasoned")]),
    ("hiking backpack 30l", [("E", "Osprey Stratos 34 Hiking Backpack, 30 Liter Size"),
                             ("S", "Osprey Talon 22 Men's Hiking Daypack")]),
    ("bluetooth speaker waterproof", [("I", "HDMI Cable 6 ft, 4K High Speed"),
                                      ("E", "JBL Flip 5 Waterproof Portable Bluetooth Speaker"),
                                      ("S", "Anker Soundcore Bluetooth Speaker, Splashproof")]),
    ("chef knife", [("S", "Victorinox 6 Inch Boning Knife, Fibrox Pro"),
                    ("E", "Victorinox Fibrox Pro 8 Inch Chef's Knife")]),
    ("camping stove propane", [("E", "Coleman Classic Propane Camping Stove, 2 Burner"),
                               ("C", "Coleman Propane Fuel Cylinder, 16 oz, 2 Pack"),
                               ("I", "Coleman Camping Chair with Cooler"),
                               ("S", "MSR PocketRocket 2 Backpacking Stove, Isobutane")]),
    ("memory card for nintendo switch", [("E", "SanDisk 256GB microSDXC Card Licensed for Nintendo Switch"),
                                         ("S", "Samsung EVO Select 256GB microSDXC Memory Card")]),
    ("foam roller", [("C", "Fit Simplify Resistance Loop Exercise Bands, Set of 5"),
                     ("E", "TriggerPoint GRID Foam Roller, Original 13 Inch")]),
    ("noise cancelling headphones", [("E", "Sony WH-1000XM4 Noise Cancelling Headphones"),
                                     ("I", "Phone Stand for Desk, Adjustable Aluminum"),
                                     ("S", "Sony MDR-ZX110 Wired On-Ear Headphones")]),
    ("espresso maker stovetop", [("E", "Bialetti Moka Express Stovetop Espresso Maker, 6 Cup"),
                                 ("C", "Lavazza Espresso Ground Coffee, 8.8 oz"),
                                 ("S", "AeroPress Coffee and Espresso Maker")]),
    ("headlamp rechargeable", [("S", "Black Diamond Spot 350 Headlamp, AAA Batteries"),
                               ("E", "Nitecore NU25 Rechargeable Headlamp, USB C")]),
    ("sleeping pad ultralight", [("E", "Therm-a-Rest NeoAir XLite Ultralight Sleeping Pad"),
                                 ("S", "Therm-a-Rest Z Lite Sol Foam Sleeping Pad"),
                                 ("C", "Sea to Summit Inflatable Camping Pillow")]),
    ("laptop sleeve 13 inch", [("I", "Wireless Charging Pad, 15W"),
                               ("E", "Amazon Basics 13.3 Inch Laptop Sleeve")]),
    ("dumbbells set", [("E", "Amazon Basics Neoprene Dumbbell Set with Stand"),
                       ("S", "Kettlebell 15 lb, Cast Iron"),
                       ("C", "Weight Lifting Gloves with Wrist Support")]),
    ("garlic press", [("S", "Chef'n Garlic Zoom Garlic Chopper"),
                      ("E", "OXO Good Grips Soft-Handled Garlic Press")]),
    ("wifi extender", [("E", "TP-Link AC1200 WiFi Range Extender"),
                       ("I", "Ethernet Cable Cat 6, 25 ft, White"),
                       ("S", "TP-Link Deco Mesh WiFi System, 2 Pack")]),
    ("trekking poles collapsible", [("E", "Black Diamond Distance Z Collapsible Trekking Poles"),
                                    ("C", "Trekking Pole Rubber Tips Replacement, 4 Pairs")]),
    ("portable ssd 1tb", [("S", "Seagate Portable 1TB External Hard Drive HDD"),
                          ("E", "Samsung T7 Portable SSD 1TB, USB 3.2")]),
    ("oven mitts heat resistant", [("E", "KitchenAid Ribbed Soft Silicone Oven Mitts, Heat Resistant"),
                                   ("I", "Bamboo Cooking Utensils Set, 6 Pieces"),
                                   ("S", "Pot Holders Cotton Quilted, Set of 4")]),
]

QPR_GAIN_ORDER = "ESCI"   # output lists letters by label E > S > C > I


def _ordinal(i: int) -> str:
    """The notebook's ordinal(): 1st, 2nd, 3rd, 4th, ..., 21st, 22nd, ..."""
    suffixes = {1: "st", 2: "nd", 3: "rd"}
    return str(i) + suffixes.get(i % 10 if i > 20 else i, "th")


def _row(task, setting, split, instruction, input_text, options, output) -> dict:
    return {"output": output, "input": input_text, "options": options, "task": task, "setting": setting,
            "split": split, "few_shot_example": None, "instruction": instruction}


def _splits(n_train: int, n_val: int, n_test: int) -> list[str]:
    """Test rows first, so hand-written test rows of a task get indices 0, 1, 2, ... in the file."""
    return ["test"] * n_test + ["train"] * n_train + ["val"] * n_val


def handwritten(instructions: dict) -> list[dict]:
    pool = lambda task, i: instructions[task]["diverse_pool"][i % 5]
    rows = []

    # Sentiment analysis: raw review text; options json.dumps of the 5 classes; output the option.
    task = "Sentiment_Analysis"
    for i, (split, (stars, review)) in enumerate(zip(_splits(12, 4, 6), SA_REVIEWS)):
        rows.append(_row(task, DIVERSE, split, pool(task, i), review, json.dumps(SA_OPTIONS),
                         SA_OPTIONS[5 - stars]))

    # Sequential recommendation: str(list) history and 20 str(list) candidates; output a letter.
    task = "Sequential_Recommendation"
    rng = random.Random(0)
    themes = list(SR_CATALOG)
    everything = [item for items in SR_CATALOG.values() for item in items]
    for i, split in enumerate(_splits(12, 4, 6)):
        items = SR_CATALOG[themes[i % len(themes)]]
        n_hist = 4 + i % 6
        start = rng.randrange(len(items))
        seq = [items[(start + k) % len(items)] for k in range(n_hist + 1)]
        history, target = seq[:-1], seq[-1]
        candidates = rng.sample([x for x in everything if x not in seq], 19) + [target]
        rng.shuffle(candidates)
        input_text = str([f"{_ordinal(k + 1)}: {item}" for k, item in enumerate(history)])
        options = str([f"{chr(65 + k)}: {item}" for k, item in enumerate(candidates)])
        rows.append(_row(task, DIVERSE, split, pool(task, i), input_text, options,
                         chr(65 + candidates.index(target))))

    # Answerability: json {"question", "document"}; yes/no.  Answer generation: answerable items only.
    for i, (split, (question, document, answerable, _)) in enumerate(zip(_splits(12, 4, 6), QA_ITEMS)):
        task = "Answerability_Prediction"
        rows.append(_row(task, DIVERSE, split, pool(task, i), json.dumps({"question": question, "document": document}),
                         None, "yes" if answerable else "no"))
    answerable = [item for item in QA_ITEMS if item[2]]
    for i, split in enumerate(_splits(8, 2, 4)):
        question, document, _, answer = answerable[i % len(answerable)]
        task = "Answer_Generation"
        rows.append(_row(task, DIVERSE, split, pool(task, i), json.dumps({"question": question, "document": document}),
                         None, answer))

    # Query-product ranking: json {"query", "product list": ["A: title", ...]}; letters by E > S > C > I.
    task = "Query_Product_Rank"
    for i, (split, (query, products)) in enumerate(zip(_splits(12, 4, 6), QPR_ITEMS)):
        letters = [chr(65 + k) for k in range(len(products))]
        product_list = [f"{letter}: {title}" for letter, (_, title) in zip(letters, products)]
        ranked = sorted(range(len(products)), key=lambda k: QPR_GAIN_ORDER.index(products[k][0]))
        rows.append(_row(task, DIVERSE, split, pool(task, i),
                         json.dumps({"query": query, "product list": product_list}), None,
                         ",".join(letters[k] for k in ranked)))
    return rows


def real_rows(shared: Path) -> list[dict]:
    test_rows = read_jsonl(shared / "test_rows_dev.jsonl")
    block = lambda task, setting: [r for r in test_rows if r["task"] == task and r["setting"] == setting]
    rows = []
    for task, (test, train, val) in REAL_TEST_PLAN.items():
        items = block(task, DIVERSE)
        for split, picks in (("test", test), ("train", train), ("val", val)):
            rows += [dict(items[k], split=split) for k in picks]
    rows += [block("Product_Relation_Prediction", "OOD_Diverse_Instruction")[k] for k in PRP_OOD_TEST]

    ave = read_jsonl(shared / "ave_train_100.jsonl")
    ave_diverse = [r for r in ave if r["setting"] == DIVERSE]
    for split, picks in zip(("train", "val", "test"), AVE_PLAN):
        rows += [dict(ave_diverse[k], split=split) for k in picks]
    rows += [[r for r in ave if r["setting"] == SINGLE][k] for k in AVE_SINGLE_TRAIN]
    return rows


def one_shot_rows(rows: list[dict]) -> list[dict]:
    """A few 1-shot test rows built as the notebooks do: test item i gets training item i of its task
    as json.dumps({"input", ["options",] "output"}) in few_shot_example."""
    out = []
    for task in ("Multiclass_Product_Classification", "Attribute_Value_Extraction", "Sentiment_Analysis"):
        test = [r for r in rows if r["task"] == task and r["setting"] == DIVERSE and r["split"] == "test"]
        train = [r for r in rows if r["task"] == task and r["setting"] == DIVERSE and r["split"] == "train"]
        for i in range(3):
            example = {"input": train[i]["input"]}
            if train[i]["options"]:
                example["options"] = train[i]["options"]
            example["output"] = train[i]["output"]
            out.append(dict(test[i], setting=ONE_SHOT, few_shot_example=json.dumps(example)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, required=True, help="folder with the real ECInstruct rows")
    parser.add_argument("--out", type=Path, default=HERE / "ecinstruct_sample.jsonl", help="output JSONL file")
    args = parser.parse_args()
    instructions = json.loads((args.shared / "ecinstruct_instructions.json").read_text())
    rows = real_rows(args.shared) + handwritten(instructions)
    rows += one_shot_rows(rows)
    fields = ("output", "input", "options", "task", "setting", "split", "few_shot_example", "instruction")
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in fields}) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")
    # eCeLLM's ESCI labels of the QPR test items the sample holds (items 0-5), so QPR scores offline.
    labels = json.loads((args.shared / "qpr_label.json").read_text())[:6]
    (args.out.parent / "qpr_label.json").write_text(json.dumps(labels) + "\n")


if __name__ == "__main__":
    main()
