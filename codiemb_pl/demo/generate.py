"""Deterministic generator for the codiemb_pl demo data (original text, MIT licensed).

Run ``python -m codiemb_pl.demo.generate`` to (re)write, next to this file:

* ``ir_train.jsonl``                     query / positives / hard negatives
* ``ir_dev/{corpus,queries}.jsonl``      BEIR-layout validation set
* ``ir_dev/qrels/dev.tsv``
* ``sts_train.jsonl``, ``sts_dev.jsonl`` graded sentence pairs (0-5)

All randomness comes from seeded ``random.Random`` instances and every output is written with
sorted, explicit ordering, so re-running the script reproduces the files byte for byte.

Building blocks
---------------
``KNOWLEDGE_BASE`` is a hand-written text block of topic families. Inside a family:

* ``T title | passage`` is a training passage, followed by 1-2 ``? question`` lines it answers;
* ``V title | passage`` is a validation passage, followed by exactly one ``? question``;
* ``D title | passage`` is a validation distractor (same family, answers no validation query).

``STS_FRAMES`` are sentence templates ("scenes") with slots. Each slot value is a group of
interchangeable surface forms (synonyms); a frame marks which slots are *minor* details and which are
*major* information, and has a few negated forms. Pairs are derived with controlled edits:

=====  ===========================================================
score  edit
=====  ===========================================================
5.0    same slot values, different template and/or synonyms
4.0    one minor detail changed
3.4    two minor details changed
3.0    one major piece of information changed
2.6    one major and one minor piece changed
2.4    negation of the same statement
2.0    two different scenes of the same topic
1.0    scenes of different topics within the same broad domain
0.0    scenes from unrelated domains
=====  ===========================================================

Train and dev use disjoint frames, so no sentence appears in both splits.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent
SEED = 20240611

# ----------------------------------------------------------------------------------------------
# Retrieval knowledge base: household science & everyday technology
# ----------------------------------------------------------------------------------------------

KNOWLEDGE_BASE = r"""
@cooking Cooking chemistry
T Searing and browning | Meat browns in a hot pan because of the Maillard reaction, in which sugars and amino acids combine above roughly 140 °C to form hundreds of new flavor compounds. A wet surface stays too cool to brown, so pat meat dry first.
? why does steak turn brown in a hot pan
? Should I dry meat before searing it?
T Salting eggplant | Sprinkling salt on sliced eggplant or cucumber pulls water out of the cells by osmosis. After about twenty minutes beads of liquid appear, and the slices cook up less soggy and absorb less oil.
? why do recipes say to salt eggplant before frying
T Caramelizing onions | Onions need thirty to forty-five minutes over medium-low heat to caramelize properly. Their natural sugars slowly break down into brown, sweet compounds; high heat only scorches the edges while the centers stay sharp.
? how long does it take to caramelize onions
? Why do my onions burn instead of turning sweet and brown?
T Acid and green vegetables | Green beans and broccoli turn a dull olive color when cooked with lemon juice or vinegar, because acid replaces the magnesium in chlorophyll. Add acidic dressings just before serving to keep the bright green.
? why did my broccoli turn olive green after adding lemon
T Boiling point and altitude | At high altitude water boils at a lower temperature, around 90 °C at 3,000 meters, so pasta and beans take noticeably longer to cook even though the pot is bubbling hard.
? Why does pasta take longer to cook in the mountains?
? what temperature does water boil at high altitude
T Emulsions | Mayonnaise and vinaigrette are emulsions, droplets of oil suspended in water. Egg yolk contains lecithin, which coats the droplets and stops them from merging, so the sauce stays thick instead of separating.
? what keeps mayonnaise from separating
T Resting meat | Letting a roast rest for ten to fifteen minutes after cooking lets the juices thicken slightly and redistribute, so less liquid runs onto the board when you slice it. The internal temperature also rises a few degrees while it rests.
? why should you let a roast rest before cutting
? Does meat keep cooking after you take it out of the oven?
T Cast iron seasoning | The black coating on a cast iron pan is polymerized oil: thin layers of fat heated past their smoke point bond to the metal and form a slick, rust-resistant surface. Soaking the pan overnight can strip it.
? what is the seasoning on a cast iron pan made of
V Starch thickening | Cornstarch thickens a sauce only once it nears boiling, when the starch granules swell and burst. Mix it with cold water first, because dry starch dropped into hot liquid forms lumps.
? why does my cornstarch sauce get lumpy
V Onions and tears | Cutting an onion breaks its cells and releases an enzyme that produces a sulfur gas; when the gas reaches your eyes it forms a mild irritant. Chilling the onion and using a sharp knife reduces the effect.
? what makes you cry when chopping onions
V Blanching | Blanching means boiling vegetables briefly and then plunging them into ice water. The quick heat stops enzymes that dull color and flavor, which is why vegetables are blanched before freezing.
? what is the purpose of blanching vegetables before freezing
D Deglazing | Deglazing a pan means pouring wine, stock or water onto the browned bits left after searing and scraping them up; the dissolved residue becomes the base of a quick pan sauce.
D Brining | A brine of salt dissolved in water seasons meat throughout and helps it hold moisture, because salt loosens muscle proteins so they trap more water during cooking.
D Smoke point | Every cooking fat has a smoke point, the temperature where it starts to break down and smoke. Refined oils such as peanut or sunflower tolerate higher heat than butter or unrefined olive oil.
D Whipping egg whites | Whipping egg whites unfolds their proteins, which then link around air bubbles to form a stable foam. A trace of yolk or grease interferes with this, so use a spotless bowl.
D Pasta water | Starchy water saved from cooking pasta helps sauces cling to the noodles and makes them glossy, since the dissolved starch acts as a light thickener and binder.
D Acid marinades | Marinades with lots of citrus or vinegar work only on the surface of meat; left too long they make the outside mushy rather than tenderizing the center.
D Knife sharpness | A sharp knife is safer than a dull one because it needs less force and is less likely to slip off the smooth skin of a tomato or a pepper.

@baking Baking
T Baking soda vs powder | Baking soda is pure sodium bicarbonate and needs an acid such as buttermilk or yogurt to release carbon dioxide. Baking powder already contains its own dry acid, so it works with plain milk.
? what is the difference between baking soda and baking powder
? Can I use baking soda in a recipe with no buttermilk or yogurt?
T Yeast temperature | Baker's yeast is most active between about 25 and 30 °C. Water hotter than roughly 55 °C kills it, which is a common reason bread dough fails to rise.
? why didn't my bread dough rise
T Gluten development | Kneading stretches and aligns gluten proteins into an elastic network that traps gas. Bread dough needs lots of kneading, while muffin and pancake batters should be mixed only until combined to stay tender.
? why should muffin batter not be overmixed
? What does kneading actually do to dough?
T Softened butter | Creaming softened butter with sugar beats tiny air pockets into the fat, which expand in the oven and lighten cakes. Butter straight from the fridge is too hard to hold the air.
? why do cake recipes ask for softened butter
T Oven hot spots | Most home ovens have hot spots and can run 10 to 20 degrees off the dial. An inexpensive oven thermometer shows the real temperature, and rotating trays halfway through evens out browning.
? my cookies burn on one side of the oven, why
? how accurate is an oven temperature dial
T Cookie spread | Cookies spread thin when the butter is too warm or the dough contains a lot of white sugar. Chilling the dough for an hour firms the fat so the cookies hold their shape.
? how do I stop cookies from spreading flat
T Proofing | Dough is properly proofed when a gentle finger press springs back slowly and leaves a slight dent. If the dent springs back instantly it needs more time; if it stays, the dough is overproofed.
? how can I tell if bread dough has risen enough
? What does the poke test for dough mean?
T Sourdough starter | A sourdough starter is flour and water colonized by wild yeasts and lactic acid bacteria. Fed regularly, it leavens bread and gives it a tangy flavor from the acids the bacteria produce.
? what is in a sourdough starter
V Measuring flour | Scooping flour straight from the bag packs it down and can add a quarter more than the recipe intends. Spooning it into the cup and leveling it, or weighing it, gives consistent results.
? why are my cakes dry and dense when I measure flour with a cup
V Cracked cheesecake | Cheesecakes crack when they bake too hot or cool too fast. A water bath keeps the edges gentle, and leaving the cake in the switched-off oven lets it cool gradually.
? how to keep a cheesecake from cracking
V Altitude baking | Above about 1,000 meters, batters rise faster and dry out more easily because of the lower air pressure. Bakers reduce leavening slightly, add a little liquid and raise the oven temperature.
? do I need to change my cake recipe at high altitude
D Eggs in baking | Eggs bind ingredients, add moisture and help leavening; their proteins set during baking and give cakes and muffins their structure.
D Parchment paper | Parchment paper is coated with silicone, so batter releases cleanly from it, and it withstands oven temperatures up to around 220 °C.
D Sugar and moisture | Sugar attracts and holds water, which is why cakes with more sugar stay moist longer and why cutting the sugar can make baked goods dry.
D Brown sugar | Brown sugar is white sugar with molasses added back; the molasses makes cookies chewier, darker and slightly acidic.
D Pie crust | Flaky pie crust relies on cold pieces of butter: as they melt in the oven they release steam and leave thin, separate layers in the dough.
D Cooling racks | Cooling racks let air circulate under a fresh loaf or cake so the bottom does not turn soggy from trapped steam.
D Dark pans | Dark metal pans absorb more heat than shiny ones, so cakes baked in them brown faster at the edges and may need a lower temperature.

@storage Food storage
T Fridge temperature | A refrigerator should hold 4 °C or below, the point under which most food-poisoning bacteria multiply slowly. The door is the warmest spot, so keep milk and raw meat on the inner shelves.
? what temperature should my fridge be set to
? Is it okay to keep milk in the fridge door?
T Ethylene and fruit | Apples, bananas and tomatoes release ethylene gas, which speeds ripening in nearby produce. Storing them away from leafy greens and carrots keeps those from wilting or turning bitter.
? why do bananas make other fruit ripen faster
T Freezer burn | Freezer burn shows up as dry, grayish patches caused by ice evaporating from the food surface. It is safe to eat but tough; wrapping food tightly and squeezing out the air prevents it.
? is freezer burned meat safe to eat
? What causes freezer burn?
T Two hour rule | Cooked leftovers should go into the fridge within two hours, or one hour on a hot day. Dividing a large pot into shallow containers helps it cool quickly through the danger zone.
? how long can cooked food sit out before refrigerating
T Bread staling | Bread goes stale faster in the refrigerator than on the counter because cold temperatures speed up starch recrystallization. For longer storage, freeze sliced bread and toast it straight from frozen.
? should I keep bread in the fridge
? why does bread get stale so fast in the refrigerator
T Potatoes and onions | Potatoes keep best in a cool, dark place but not the fridge, where the cold turns their starch to sugar. Store them apart from onions, because moisture and gases from each make the other sprout or rot sooner.
? where is the best place to store potatoes
T Thawing safely | The safest ways to thaw meat are overnight in the refrigerator or sealed in cold water changed every thirty minutes. Thawing on the counter lets the outside warm into the bacterial danger zone.
? Can I thaw chicken on the kitchen counter?
T Crystallized honey | Honey crystallizes because it is a supersaturated sugar solution from which glucose slowly separates as crystals. It has not spoiled, and warming the jar in hot water dissolves the crystals again.
? my honey turned solid and grainy, is it bad
V Fresh herbs | Soft herbs such as basil, parsley and cilantro last longer with their stems in a glass of water like cut flowers. Basil prefers room temperature, while parsley and cilantro do well loosely covered in the fridge.
? how do I keep fresh basil from wilting
V Vacuum sealing | Vacuum sealing removes most of the air around food, slowing oxidation and freezer burn, so frozen meat can keep its quality two or three times longer than in ordinary bags.
? how much longer does vacuum sealed food last in the freezer
V Dented cans | A small dent on the side of a can is usually fine, but deep dents on the seam, bulging lids or spurting liquid can signal a broken seal or bacterial growth, and the food should be thrown away.
? is it safe to eat from a dented can
D Best before dates | A best-before date refers to quality rather than safety; many dry goods remain fine well past it, unlike use-by dates on perishable foods.
D Leftover rice | Cooked rice can carry heat-resistant bacterial spores, so it should be cooled quickly after cooking and eaten within a day or two.
D Full freezer | A full freezer holds its temperature better than an empty one because the frozen mass acts as a cold reservoir each time the door opens.
D Avocado browning | Cut avocado turns brown when enzymes in the flesh react with oxygen; pressing plastic wrap directly onto the surface slows the reaction.
D Storing flour | Whole wheat flour contains oils from the germ and goes rancid within months at room temperature, so it keeps much longer in the freezer.
D Egg storage | Eggs keep for several weeks in the fridge, and storing them in their carton protects them from absorbing odors from other foods.
D Cheese paper | Hard cheese keeps best wrapped in wax or cheese paper, which lets it breathe while preventing it from drying out or sweating.

@coffee Coffee and tea
T Brewing temperature | Coffee extracts best with water between 90 and 96 °C, just off the boil. Cooler water under-extracts and tastes sour, while a full boil can pull out harsh bitter notes.
? what water temperature is best for brewing coffee
? Why does my coffee taste sour?
T Grind size | Grind size controls how fast water extracts coffee: espresso needs a fine powder, drip a medium grind and French press a coarse grind so the metal filter does not clog and the cup is not muddy.
? what grind should I use for a French press
T Green tea bitterness | Green tea turns bitter when steeped in boiling water or for too long, since tannins dissolve quickly at high temperatures. Water around 75 to 80 °C and two or three minutes give a sweeter cup.
? why is my green tea so bitter
? how long should green tea steep
T Storing coffee beans | Roasted coffee beans stay fresh longest in an airtight, opaque container at room temperature. Beans lose aroma within a few weeks of roasting, and grinding just before brewing preserves more flavor.
? how should I store coffee beans
T Decaffeination | Decaffeinated coffee is made by soaking green beans in water, solvents or pressurized carbon dioxide to pull out caffeine before roasting. About 97 percent of the caffeine is removed, not all of it.
? does decaf coffee have any caffeine
? How do they take caffeine out of coffee?
T Descaling kettles | Hard water leaves a white crust of calcium carbonate inside kettles and coffee machines. Running a cycle of diluted white vinegar or citric acid dissolves the scale and restores heating speed.
? how do I remove white scale from my kettle
T Cold brew | Cold brew is made by steeping coarse grounds in cold water for 12 to 24 hours. Because little acid is extracted at low temperature, it tastes smoother and less acidic than hot coffee.
? why is cold brew less acidic
T Milk frothing | Milk froths best when cold and fresh; heating it to about 60 to 65 °C while adding air gives a stable foam, but going much hotter scalds the milk and the foam collapses.
? what temperature should milk be for a latte
? Why won't my milk foam stay?
V Caffeine in tea and coffee | A cup of brewed coffee typically has two to three times the caffeine of a cup of black tea, although strong teas steeped for a long time narrow the gap.
? does tea have more caffeine than coffee
V Crema | Crema, the golden foam on espresso, forms when pressurized water dissolves carbon dioxide from freshly roasted beans; stale beans produce little or none.
? why doesn't my espresso have crema
V Blooming | Pouring a little hot water over fresh grounds and waiting thirty seconds lets trapped carbon dioxide escape, so the rest of the water can extract evenly. This pause is called the bloom.
? what does blooming coffee grounds do
D Roast levels | Light roasts keep more of the bean's fruity and acidic character, while dark roasts taste smoky and bitter from longer exposure to heat.
D Herbal tea | Herbal infusions such as chamomile and peppermint are not made from the tea plant and usually contain no caffeine at all.
D Coffee filters | Paper filters trap coffee oils that metal filters let through, so paper-filtered coffee tastes cleaner and lighter in body.
D Matcha | Matcha is powdered green tea whisked into water, so you consume the whole ground leaf rather than an infusion of it.
D Tea bags | Tea bags often contain small broken leaf pieces, which infuse quickly but can taste flatter than whole loose leaves.
D Reheating coffee | Reheated coffee tastes harsher because aromatic compounds evaporate and some acids keep forming while it sits hot.
D Coffee ratio | A common starting ratio for brewed coffee is about one gram of grounds to sixteen grams of water, adjusted to taste.

@bicycles Bicycles
T Bike tire pressure | Road bike tires usually run at 80 to 110 psi and mountain bike tires at 25 to 35 psi; the recommended range is printed on the tire sidewall. Underinflated tires pinch-flat more easily and feel sluggish.
? what pressure should my bike tires be
? where do I find the right tire pressure for my bicycle
T Chain lubrication | A bicycle chain should be lubricated every few hundred kilometers or after riding in rain. Apply a drop to each roller, spin the cranks, then wipe off the excess, since surplus oil collects grit.
? how often should I oil my bike chain
T Brake pad wear | Rim brake pads have grooves that act as wear indicators; once the grooves disappear, replace the pads. Squealing brakes often mean the pads are glazed or the rims are dirty.
? when should I replace bicycle brake pads
? Why do my bike brakes squeal?
T Fixing a puncture | To fix a flat, remove the tube, inflate it slightly and listen for hissing or dunk it in water to find bubbles. Roughen the area, apply a patch, and run your fingers around the inside of the tire to find the thorn.
? how do I find the hole in a bike inner tube
T Saddle height | At the right saddle height your leg is almost straight, with a slight bend at the knee, when the pedal is at its lowest point. A saddle that is too low strains the knees.
? how high should my bike seat be
? Why do my knees hurt after cycling?
T Shifting gears | Shift gears while pedaling lightly, not while pushing hard uphill, and avoid crossing the chain from the largest front ring to the largest rear cog, which bends the chain at an angle and wears it out.
? when is the right time to change gears on a bike
T Chain wear | Chains stretch as their pins and rollers wear. A chain checker shows when wear reaches about 0.5 to 0.75 percent; replacing the chain then saves the more expensive cassette and chainrings.
? how do I know if my bike chain is worn out
T Tubeless tires | Tubeless tires hold air without an inner tube and contain liquid sealant that plugs small punctures while you ride, which lets riders use lower pressures for better grip.
? what are the advantages of tubeless bike tires
? How does sealant in tubeless tires work?
V Helmet replacement | A bicycle helmet should be replaced after any crash where it hit the ground, even if no crack is visible, because the foam compresses once to absorb the impact and cannot protect a second time.
? do I need a new helmet after a crash
V Disc brakes in rain | Disc brakes stop more consistently in wet weather than rim brakes because the braking surface sits near the hub, away from the water and mud thrown up from the road.
? are disc brakes better than rim brakes in the rain
V E-bike range | An electric bike's range depends on battery capacity, assist level, rider weight and hills; a 500 Wh battery commonly gives somewhere between 40 and 100 kilometers.
? how far can an e-bike go on one charge
D Frame materials | Aluminum frames are light and affordable, steel frames are durable and comfortable, and carbon fiber frames are the lightest but more costly to repair.
D Bike lights | Many places require a white front light and a red rear light when riding after dark; flashing modes make a bike easier to notice in traffic.
D Washing a bike | Washing a bike with mild soap and low-pressure water avoids forcing water into the bearings of the hubs and bottom bracket.
D Quick release levers | A quick release lever should be closed firmly enough to leave an imprint on your palm; a loose lever can let the wheel come out while riding.
D Spoke tension | Wheels stay true when the spokes have even tension; a rim that wobbles from side to side usually means some spokes have loosened.
D Bike locks | A sturdy U-lock through the frame and rear wheel deters theft far better than a thin cable lock, which can be cut in seconds.
D Cadence | Experienced cyclists often pedal at 80 to 100 revolutions per minute, choosing easier gears instead of grinding slowly up hills.

@cars Car basics
T Tread depth | The legal minimum tread depth in many countries is 1.6 mm, but wet-road grip falls off sharply below about 3 mm. The coin test or the built-in wear bars show when tires need replacing.
? how do I check if my car tires are worn
? what is the minimum tread depth for car tires
T Engine oil | Engine oil lubricates moving parts and carries heat away. Check the dipstick with the engine off on level ground; the level should sit between the two marks, and dark, gritty oil is due for a change.
? how do I check my car's oil level
T Jump starting | To jump start a car, clamp red to the dead battery's positive terminal, then to the good battery's positive, black to the good battery's negative, and finally to bare metal on the dead car away from the battery.
? what order do jumper cables go on
? How to jump start a car with a flat battery?
T Cold tire pressure | Tire pressure drops about 1 psi for every 5 to 6 °C fall in temperature, so the warning light often comes on during the first cold morning of autumn. Check pressures while the tires are cold.
? why does my tire pressure light come on when it gets cold
T Coolant | Coolant circulates through the engine and radiator to carry away heat and contains antifreeze so it does not freeze in winter. Never open a radiator cap on a hot engine, because the fluid is under pressure.
? is it safe to open the radiator cap when the engine is hot
? what does engine coolant do
T Highway fuel use | Fuel economy drops at high speed because air resistance grows with the square of velocity. Smooth acceleration, correct tire pressure and removing roof racks all save fuel.
? why does my car use more fuel on the highway at high speed
T Foggy windshield | Windshields fog when warm, moist air from breath meets cold glass. Turning on the air conditioning dries the air, and switching off recirculation brings in drier outside air, clearing the glass faster.
? how do I defog my windshield quickly
T Brake noise | A high-pitched squeal when braking often comes from a small metal wear indicator that touches the rotor when the pads are thin; grinding means the pads are worn through and need urgent service.
? what does a squealing noise when braking mean in a car
? my car brakes are grinding, is that bad
V Check engine light | A steady check engine light signals a fault logged by the engine computer, often a minor one such as a loose fuel cap. A flashing light means misfires that can damage the catalytic converter, so stop driving soon.
? what does a flashing check engine light mean
V Car battery life | Car batteries usually last three to five years. Frequent short trips in cold weather shorten their life, because the alternator never gets the chance to fully recharge the battery.
? how long does a car battery last
V Windshield chips | A small chip in a windshield can often be filled with resin if it is smaller than a coin, but temperature swings and bumps can spread it into a long crack if it is left alone.
? can a small windshield chip be repaired
D Tire rotation | Rotating tires every 8,000 to 10,000 kilometers evens out the wear between the front and rear axles and helps the set last longer.
D Wiper blades | Wiper blades harden in sunlight and should be replaced roughly once a year or as soon as they start leaving streaks.
D Engine braking | Shifting to a lower gear on long descents lets the engine slow the car and keeps the brakes from overheating.
D Air filter | A clogged engine air filter restricts airflow and can reduce performance; it is one of the cheapest parts to replace yourself.
D Headlight haze | Plastic headlight covers turn yellow and cloudy from years of UV exposure; inexpensive polishing kits can restore their clarity.
D Parking brake | Using the parking brake on slopes takes strain off the transmission's parking pawl and keeps the car from rolling.
D Hydroplaning | Hydroplaning happens when a layer of water lifts the tires off the road; easing off the accelerator without braking hard helps regain grip.

@batteries Batteries and charging
T Partial charging | Lithium-ion batteries age fastest when kept at 100 percent charge or fully drained. Keeping a phone between roughly 20 and 80 percent and avoiding heat extends the battery's useful life.
? is it bad to charge my phone to 100 percent
? How can I make my phone battery last more years?
T Batteries in the cold | Batteries deliver less power in the cold because the chemical reactions inside them slow down. A phone that shuts off at 30 percent in freezing weather usually recovers once it warms up.
? why does my phone die quickly in cold weather
T Storing batteries | Spare batteries keep best in a cool, dry place at room temperature. Storing loose batteries in a drawer with coins or keys can short the terminals and drain or heat them.
? should I keep batteries in the fridge
? how to safely store spare batteries
T Swollen battery | A swollen lithium-ion battery has produced gas from internal damage and can catch fire. Stop charging the device, do not puncture or press on it, and take it to a battery recycling point.
? what should I do if my laptop battery is swelling
T Milliamp-hours | Milliamp-hours measure how much charge a battery holds. A 10,000 mAh power bank does not deliver that full amount to a phone, because voltage conversion and heat waste around a third of it.
? why doesn't a 10000 mAh power bank charge my phone 3 times
? what does mAh mean on a battery
T Fast charging | Fast chargers raise the voltage or current while the battery is low and taper off as it fills, which is why the first half charges much faster than the last 20 percent.
? why does my phone charge slowly after 80 percent
T Rechargeable AA cells | Nickel-metal hydride AA batteries provide 1.2 volts instead of 1.5, but they hold that voltage steadily, so they work well in most devices and can be recharged hundreds of times.
? are rechargeable AA batteries 1.2 volts okay for my devices
T Leaking alkaline batteries | Alkaline batteries left in unused devices can leak potassium hydroxide, which forms a white crusty residue that corrodes contacts. Remove batteries from gear stored for months and clean residue with a little vinegar.
? what is the white crust on old batteries
? how do I clean corroded battery contacts
V Battery disposal | Lithium batteries should never go in household trash, because crushing in garbage trucks can ignite them. Many electronics stores and municipal collection sites accept them for recycling.
? can I throw lithium batteries in the trash
V Overnight charging | Modern phones stop drawing full current once charged, and many learn your routine to finish charging just before you wake, so charging overnight causes little extra wear.
? is it safe to leave my phone charging overnight
V Memory effect | The memory effect, where a battery seems to remember a partial capacity, affected old nickel-cadmium cells; lithium-ion batteries do not need full discharges to stay healthy.
? do I need to fully drain my phone battery before charging
D Button cells | Coin-shaped button batteries are dangerous if swallowed by children, because they can burn through the lining of the throat within hours.
D Battery chemistries | Alkaline batteries are designed for single use, while lithium-ion and nickel-metal hydride batteries are built to be recharged many times.
D Wireless charging | Wireless charging transfers energy through magnetic induction and is somewhat less efficient than a cable, producing more heat in the process.
D Power banks on flights | Airlines usually require power banks to travel in carry-on luggage rather than checked bags, and very large ones need approval.
D Battery percentage | A phone's battery percentage is estimated from voltage and usage history, so the number can jump after the system recalibrates.
D USB-C cables | Not every USB-C cable supports high-wattage charging; cables rated for 100 watts contain a small chip that identifies their capability.
D Solar chargers | Small portable solar chargers produce far less power under clouds, so they work best when left in direct sun for several hours.

@electricity Home electricity
T Tripping breaker | A circuit breaker trips when a circuit draws more current than its rating, often because too many high-power appliances such as a kettle and a space heater run on the same circuit. Unplug something before resetting it.
? why does my circuit breaker keep tripping
? What should I do before resetting a tripped breaker?
T Ground-fault outlets | Ground-fault outlets, found in bathrooms and kitchens, cut power within milliseconds when current leaks to ground, for example through a person touching water. Their test and reset buttons should be checked monthly.
? what are the buttons on bathroom outlets for
T LED bulbs | An LED bulb uses around 80 percent less electricity than an incandescent bulb of the same brightness and can last 15,000 hours or more. Brightness is measured in lumens, not watts.
? how much energy do LED bulbs save
? what does lumens mean on a light bulb
T Extension cords | Extension cords are rated for a maximum load, and running a heater through a thin cord can overheat it. Never daisy-chain power strips or run cords under rugs, where heat cannot escape.
? is it safe to plug a space heater into an extension cord
T Standby power | Many devices draw standby power even when switched off, such as TVs, game consoles and chargers. This phantom load can account for five to ten percent of a home's electricity use.
? do appliances use electricity when turned off
T Dimmable LEDs | Not all LED bulbs work with dimmer switches; non-dimmable bulbs may flicker, buzz or fail early on a dimmer. Look for bulbs labeled dimmable and a dimmer rated for LED loads.
? why does my LED bulb flicker on a dimmer
? can I use any LED bulb with a dimmer switch
T Watts and kilowatt-hours | Watts measure the rate of energy use and kilowatt-hours measure the total. A 2,000 watt heater running for three hours uses 6 kWh, which is what the utility bills you for.
? how do I calculate how much electricity an appliance uses
T Surge protectors | A surge protector diverts brief voltage spikes from lightning or grid switching away from electronics. Its protective components wear out with each surge, so older units may no longer protect anything.
? do surge protectors wear out
? what does a surge protector actually do
V Warm outlets | An outlet or switch plate that feels warm or smells of burning plastic often indicates a loose connection; turn off the breaker and have an electrician inspect it.
? why is my wall outlet warm to the touch
V Color temperature | Bulb color temperature is given in kelvin: around 2,700 K looks warm and yellowish, while 5,000 K and above looks cool and bluish like daylight.
? what do 2700K and 5000K mean on light bulbs
V Fridge in a power outage | A closed refrigerator keeps food cold for about four hours during a power outage, and a full freezer holds its temperature for roughly 48 hours if the door stays shut.
? how long will food stay cold in the fridge when the power goes out
D Three-prong plugs | The third, round prong on a plug connects to ground, giving fault current a safe path to follow instead of flowing through a person.
D Smart plugs | Smart plugs switch appliances on and off on a schedule, and some report energy use, which helps identify power-hungry devices.
D Fuses | Older homes may have fuses instead of breakers; a blown fuse must be replaced with a new one of exactly the same rating.
D Voltage standards | Household outlets supply about 120 volts in North America and 230 volts in most of Europe, so travelers may need a converter.
D Two-way switches | A light that can be switched from two locations uses a pair of three-way switches connected by extra traveler wires.
D Electricity meters | Digital electricity meters record usage in kilowatt-hours and can send their readings to the utility automatically.
D Electric blankets | Electric blankets should not be folded or tucked tightly while in use, because creased heating wires can overheat.

@networking Home networking
T 2.4 and 5 GHz bands | The 2.4 GHz Wi-Fi band reaches farther and passes through walls better, while 5 GHz is faster but has a shorter range. Devices far from the router often get a steadier connection on 2.4 GHz.
? what is the difference between 2.4 GHz and 5 GHz wifi
? Which wifi band is better for a room far from the router?
T Router placement | A router works best placed centrally and high up, away from thick walls, metal cabinets, aquariums and microwaves. Hiding it in a closet or corner can halve the signal in distant rooms.
? where should I put my wifi router
T Restarting the router | Restarting a router clears its memory, drops stuck connections and often fixes slowdowns. Unplug it for about thirty seconds so the capacitors fully discharge before powering it back on.
? why does restarting the router fix the internet
? how long should I unplug my router
T Mesh networks | A mesh Wi-Fi system uses several units that relay traffic to each other, covering a large or multi-story home with one network name. Range extenders are cheaper but usually halve the available speed.
? mesh wifi vs range extender
T Wi-Fi security | WPA2 or WPA3 encryption with a long passphrase protects home Wi-Fi; the older WEP standard can be cracked in minutes. Changing the router's default admin password matters just as much.
? which wifi security setting should I use
? Is WEP encryption still safe?
T Ethernet for gaming | A wired Ethernet connection gives lower and steadier latency than Wi-Fi, which is why online gamers and video callers often run a cable to the router or use powerline adapters.
? is ethernet better than wifi for gaming
T Bandwidth and latency | Bandwidth is how much data a connection can carry per second, while latency, or ping, is how long a signal takes to make a round trip. Video streaming needs bandwidth; gaming needs low latency.
? what is the difference between bandwidth and ping
T Channel interference | In apartment buildings many routers compete on the same channels. On 2.4 GHz, channels 1, 6 and 11 do not overlap, and choosing the least crowded one can noticeably improve speed.
? why is my wifi slow in an apartment building
? which wifi channel should I use on 2.4 GHz
V Guest networks | A guest Wi-Fi network gives visitors and smart home gadgets internet access while keeping them separated from your computers and shared files.
? why should I set up a guest wifi network
V Speed tests | A speed test on a phone over Wi-Fi often shows less than the plan's advertised speed, because the wireless link, the device and the test server all limit the result; a wired test shows the true line speed.
? why is my internet speed test lower than what I pay for
V Router firmware | Router manufacturers release firmware updates that patch security holes and fix bugs; enabling automatic updates keeps this often forgotten device protected.
? do I need to update my router's firmware
D IP addresses | Your router hands out local IP addresses to devices using DHCP, while your internet provider gives the router a single public address.
D Modem and router | A modem connects your home to the internet provider's line, while a router creates the local network and shares that connection among devices.
D Powerline adapters | Powerline adapters send network data through the home's electrical wiring, useful where Wi-Fi is weak and running a cable is impractical.
D Wi-Fi 6 | Wi-Fi 6 handles many devices at once more efficiently, which helps in homes full of phones, televisions and smart speakers.
D DNS | DNS translates website names into numeric addresses, and a slow DNS server can delay the start of every page load.
D Ethernet cable categories | Cat 5e Ethernet cable supports gigabit speeds, while Cat 6 handles higher frequencies and faster links over short runs.
D Parental controls | Many routers include parental controls that block certain sites or pause internet access for chosen devices on a schedule.

@devices Phones and computers
T Wet phone | If a phone gets wet, switch it off, do not charge it, and dry the outside. Putting it in rice does little; leaving it in a dry, ventilated place for a day or two works as well or better.
? does putting a wet phone in rice work
? what to do when phone falls in water
T Laptop overheating | Laptops overheat when dust clogs the fan and vents or when they sit on soft surfaces such as beds that block airflow. Cleaning the vents with compressed air often lowers temperatures considerably.
? why is my laptop so hot and loud
T Full storage | Phones and computers slow down when storage is almost full, because the system needs free space for temporary files and updates. Keeping at least 10 to 15 percent free helps.
? does full storage make my phone slow
T Screen cleaning | Clean screens with a microfiber cloth lightly dampened with water. Glass cleaners with ammonia or alcohol can strip the oil-repellent coating on phones and damage matte laptop displays.
? how should I clean my laptop screen
? can I use window cleaner on my phone screen
T 3-2-1 backups | The 3-2-1 backup rule means keeping three copies of important files on two different types of storage, with one copy off site or in the cloud, so a single fire or theft cannot destroy them all.
? what is the 3-2-1 backup rule
T Software updates | Software updates patch security vulnerabilities that attackers actively exploit, so delaying them leaves a device exposed. Many updates also fix battery drain and stability bugs.
? why are software updates important
? Is it risky to skip phone updates?
T SSD upgrade | A solid-state drive has no moving parts and reads data many times faster than a spinning hard disk, so swapping an old laptop's hard drive for an SSD makes it boot and open programs much faster.
? will an SSD make my old laptop faster
T Two-factor authentication | Two-factor authentication requires a second proof, such as a code from an app, in addition to a password. Even if a password leaks, an attacker without the second factor cannot log in.
? what is two factor authentication and why use it
? Does 2FA help if my password was leaked?
V Password managers | A password manager generates and stores a unique, long password for every site, so a breach at one service does not expose your other accounts.
? should I use a password manager
V Night mode | Screens emit blue light that can suppress melatonin in the evening; night mode shifts colors warmer, though keeping screens away before bed matters more.
? does night mode on my phone help me sleep
V Keyboard spills | After a spill on a laptop keyboard, shut it down immediately, unplug it and turn it upside down to drain; sugary drinks leave sticky residue that may need professional cleaning.
? what to do after spilling coffee on a laptop
D RAM | RAM is short-term working memory; having more of it lets a computer keep many browser tabs and programs open without slowing down.
D Phishing | Phishing emails imitate trusted companies to trick people into typing their passwords into fake login pages.
D Screen protectors | Tempered glass screen protectors absorb scratches and small impacts that would otherwise mark the phone's own display.
D Cloud sync | Cloud storage keeps files in sync across devices, but deleting a file on one device may delete it everywhere else too.
D Restarting devices | Restarting a phone or computer clears temporary memory and can resolve apps that freeze or behave strangely.
D Charging ports | Lint packed into a phone's charging port can stop the cable from seating fully; a wooden toothpick can remove it gently.
D Antivirus | Built-in security tools on modern operating systems provide adequate basic malware protection for most home users.

@gardening Gardening
T Deep watering | Watering deeply once or twice a week encourages roots to grow down where the soil stays moist, while frequent light sprinkling keeps roots shallow. Early morning watering loses less to evaporation.
? how often should I water my vegetable garden
? what time of day is best to water plants
T Composting | A compost pile needs a mix of green materials such as grass clippings and food scraps for nitrogen and brown materials such as dry leaves and cardboard for carbon, plus air and moisture like a wrung-out sponge.
? what should I put in a compost pile
? Why does my compost smell bad?
T Blossom end rot | Dark, sunken patches on the bottom of tomatoes, called blossom end rot, come from a calcium shortage in the fruit, usually caused by uneven watering rather than poor soil.
? why do my tomatoes have black spots on the bottom
T Mulch | A layer of mulch five to eight centimeters thick keeps soil moist, cools roots and smothers weeds. Keep it a few centimeters away from stems and tree trunks to prevent rot.
? how thick should mulch be
T Frost dates | Tender plants such as tomatoes, peppers and basil should go outside only after the last spring frost, since a single night below freezing can kill them. Local frost dates are a useful guide.
? when can I plant tomatoes outside
? Will one frost kill my pepper plants?
T Soil pH | Most vegetables prefer slightly acidic soil with a pH between 6 and 7. Blueberries need much more acidic soil, around 4.5 to 5.5, and their leaves turn yellow in alkaline ground.
? why are my blueberry leaves turning yellow
T Tomato suckers | Removing suckers, the shoots that grow between a tomato's main stem and its branches, directs energy into fewer, larger fruits and improves air flow, which reduces leaf disease.
? should I remove suckers from tomato plants
T Pollination | Squash and cucumber flowers need bees to carry pollen from male to female blossoms. When pollinators are scarce, small fruits shrivel, and gardeners can hand-pollinate with a soft brush.
? why are my zucchini falling off when they are small
? how do I hand pollinate squash
V Crop rotation | Planting the same vegetable family in the same bed every year builds up soil pests and diseases; rotating crops on a three or four year cycle breaks that pattern.
? why should I rotate crops in my garden
V Sowing depth | A common rule is to sow seeds at a depth about two to three times their width; tiny seeds such as lettuce need light to germinate and barely any soil on top.
? how deep should I plant seeds
V Slugs | Slugs feed at night and in damp weather, leaving ragged holes and slime trails; beer traps, copper tape and evening hand-picking keep them in check without chemicals.
? what is eating holes in my lettuce at night
D Raised beds | Raised beds warm up earlier in spring and drain well, which makes them useful where the native soil is heavy clay.
D Companion planting | Companion planting pairs crops such as basil and tomatoes, although the evidence for many traditional pairings is limited.
D Hardening off | Seedlings raised indoors should be hardened off by spending a little more time outdoors each day for about a week before planting.
D Earthworms | Earthworms tunnel through the soil, improving drainage and mixing organic matter from the surface into deeper layers.
D Weeding | Pulling weeds after rain is easier because moist soil lets go of the roots, so the whole plant comes out intact.
D Fertilizer labels | The three numbers on a fertilizer bag give the percentages of nitrogen, phosphorus and potassium it contains.
D Cover crops | Cover crops such as clover protect bare soil over winter and add organic matter when they are turned in during spring.

@houseplants Houseplants
T Overwatering | Overwatering kills more houseplants than drought: soggy soil suffocates roots and causes rot. Water when the top few centimeters of soil feel dry, and always use pots with drainage holes.
? how often should I water houseplants
? why is my houseplant wilting even though the soil is wet
T Yellow leaves | Lower leaves turning yellow and soft usually point to overwatering, while crispy brown edges suggest dry air or underwatering. A single old leaf yellowing now and then is normal.
? why are the leaves on my plant turning yellow
T Low light plants | Snake plants, ZZ plants and pothos tolerate low light, making them good choices for north-facing rooms, though they grow slowly there. Almost no plant thrives in a windowless room without a grow light.
? what plants grow in a dark room
? best houseplants for a north facing window
T Repotting | A plant needs repotting when roots circle the bottom or poke out of the drainage holes. Move up only one pot size, since a much larger pot holds excess wet soil around the roots.
? how do I know when to repot a plant
T Fungus gnats | Fungus gnats are tiny flies whose larvae live in constantly moist potting soil. Letting the top layer dry out between waterings and using yellow sticky traps usually ends an infestation.
? how do I get rid of small flies in my plant soil
T Leggy succulents | Succulents store water in their thick leaves and need bright light and gritty, fast-draining soil. Indoors they stretch and turn pale when the light is too weak.
? why is my succulent getting tall and leggy
? what soil do succulents need
T Humidity | Tropical houseplants such as calatheas and ferns like humid air, and in heated homes their leaf tips turn brown. Grouping plants or placing them on a tray of wet pebbles raises the local humidity.
? why are the tips of my fern leaves brown
T Propagating pothos | Pothos and many other vining plants root easily from stem cuttings: cut just below a node, place the cutting in water, and move it to soil once the roots are a few centimeters long.
? how do I propagate pothos
? can I grow a new plant from a cutting in water
V Winter rest | Most houseplants grow slowly in winter because of the shorter days, so they need less water and no fertilizer until spring growth resumes.
? should I fertilize houseplants in winter
V Dusty leaves | Dust on large leaves blocks light and slows photosynthesis; wiping them with a damp cloth every few weeks keeps the plants healthier.
? should I clean the leaves of my houseplants
V Plants toxic to pets | Some common houseplants, including lilies, dieffenbachia and sago palm, are toxic to cats or dogs, and lilies can cause kidney failure in cats even in small amounts.
? which houseplants are poisonous to cats
D Self-watering pots | Self-watering pots have a reservoir that wicks moisture up into the soil, which is helpful for people who travel often.
D Grow lights | Full-spectrum LED grow lights let plants thrive in rooms with little daylight when they run for about twelve hours a day.
D Orchids | Moth orchids grow on trees in nature and are potted in bark rather than soil so that their roots get plenty of air.
D Tap water | Some sensitive plants react to fluoride or salts in tap water, which can also leave crusty white deposits on pots.
D Spider mites | Spider mites leave fine webbing and speckled leaves, and they multiply quickly in warm, dry indoor air.
D Rotating pots | Turning pots a quarter turn each week keeps plants growing evenly instead of leaning toward the window.
D Terracotta | Terracotta pots are porous and let soil dry faster than plastic pots, which suits plants that dislike wet roots.

@weather Weather
T Thunderstorm distance | Counting the seconds between a lightning flash and the thunder estimates the storm's distance: sound travels about one kilometer every three seconds. If the gap is under thirty seconds, go indoors.
? how can I tell how far away a thunderstorm is
? how many seconds between lightning and thunder is dangerous
T Dew point | The dew point is the temperature at which air becomes saturated and water vapor condenses. When the dew point is above about 20 °C, the air feels muggy regardless of the actual temperature.
? what does dew point mean
T Chance of rain | A 40 percent chance of rain means that, on days with similar forecasts, rain falls at a given spot in the forecast area about four times in ten, not that it rains for 40 percent of the day.
? what does a 40 percent chance of rain actually mean
? Does 30% chance of rain mean it rains for 30% of the day?
T Wind chill | Wind chill describes how cold it feels on exposed skin, because wind strips away the thin layer of warm air around the body. It does not cool objects below the actual air temperature.
? can wind chill freeze my car's water pipes
? what is wind chill
T Morning fog | Radiation fog forms on clear, calm nights when the ground loses heat and cools the air above it to its dew point. It usually burns off within a few hours of sunrise.
? why is there fog in the morning after a clear night
T Summer hail | Hail forms when strong updrafts in thunderstorms carry raindrops high into freezing air, where they collect layers of ice until they are too heavy and fall, which is why hail is common in summer storms.
? why does it hail in summer
T Barometric pressure | Falling air pressure often signals an approaching low-pressure system and unsettled weather, while rising pressure usually brings clearer, calmer conditions.
? what does a falling barometer mean
? how does air pressure relate to weather
T Rainbows | A rainbow appears when sunlight enters raindrops, bends and reflects inside them, and splits into colors. You see one only with the sun behind you and rain in front, usually in early morning or late afternoon.
? why do rainbows only appear with the sun behind you
V UV index | The UV index forecasts the strength of sunburn-causing radiation; at values of 3 or above, sun protection is recommended, and UV can be strong even on cloudy days.
? can you get sunburned on a cloudy day
V Heat index | The heat index combines temperature and humidity to show how hot it feels, since humid air slows the evaporation of sweat that normally cools the body.
? why does humid weather feel hotter
V Sleet and freezing rain | Sleet forms when snowflakes melt in a warm layer of air and refreeze into ice pellets before landing, while freezing rain stays liquid until it hits cold surfaces and glazes them.
? what is the difference between sleet and freezing rain
D Weather fronts | A passing cold front often brings a short burst of heavy showers followed by cooler, drier and clearer air.
D Thunderclouds | Tall, anvil-shaped cumulonimbus clouds are the ones that produce thunderstorms, heavy downpours and sometimes tornadoes.
D Sea breeze | On sunny days the land heats faster than the sea, drawing a cool breeze inland from the water during the afternoon.
D Relative humidity | Relative humidity compares how much water vapor the air holds with the maximum it could hold at that temperature.
D Ground frost | Frost forms on clear nights when surfaces cool below freezing and water vapor deposits on them directly as ice crystals.
D Lightning and cars | Cars with metal roofs offer protection from lightning because the current travels around the outer metal shell.
D Monsoons | Monsoons are seasonal shifts in prevailing winds that bring months of heavy rain to large parts of South Asia.

@firstaid First aid
T Minor burns | Cool a minor burn under cool running water for about twenty minutes, which limits tissue damage. Do not use ice, butter or toothpaste, and cover the burn loosely with a clean, non-fluffy dressing.
? what should I put on a burn
? how long should I run a burn under water
T Nosebleeds | For a nosebleed, sit up and lean forward, then pinch the soft part of the nose for ten to fifteen minutes. Tilting the head back lets blood run down the throat, which can cause vomiting.
? should you tilt your head back for a nosebleed
T Ankle sprains | A mild ankle sprain is usually treated with rest, ice wrapped in a cloth for fifteen to twenty minutes at a time, gentle compression and elevation above heart level during the first couple of days.
? how do I treat a twisted ankle
T Bee stings | Remove a bee stinger quickly by scraping it out sideways with a fingernail or card; squeezing it with tweezers can inject more venom. Swelling of the face or trouble breathing needs emergency help.
? how do I get a bee stinger out
? when is a bee sting an emergency
T Choking | If an adult is choking and cannot cough or speak, give up to five firm back blows between the shoulder blades, then up to five abdominal thrusts, and call emergency services if the blockage does not clear.
? what to do if someone is choking
T Cleaning cuts | Clean a small cut by rinsing it under running water and washing around it with soap. Apply gentle pressure to stop bleeding, then cover it; deep or gaping cuts may need stitches.
? how do I clean a small cut
? when does a cut need stitches
T Heat exhaustion | Heat exhaustion causes heavy sweating, dizziness and nausea. Move the person somewhere cool, loosen their clothing and give sips of water; confusion or hot, dry skin may indicate heat stroke, an emergency.
? what are signs of heat exhaustion
T Recovery position | An unconscious person who is breathing normally should be placed in the recovery position, on their side with the head tilted back, so the airway stays open and fluids can drain from the mouth.
? what is the recovery position used for
? how should I lay an unconscious person who is breathing
V Splinters | Most splinters come out with clean tweezers pulled at the same angle they went in; soaking the area in warm water first softens the skin. Deep splinters or those under a nail may need a doctor.
? how do I remove a splinter
V Chemicals in the eye | If a chemical splashes into an eye, rinse it with clean, lukewarm water for at least fifteen minutes while holding the eyelid open, and seek medical advice afterward.
? what to do if cleaning product gets in your eye
V Jellyfish stings | For many jellyfish stings, rinsing with seawater rather than fresh water and lifting off tentacles with tweezers helps, and soaking in hot water can ease the pain.
? should I use fresh water on a jellyfish sting
D First aid kits | A home first aid kit should include adhesive bandages, sterile gauze, tape, gloves, scissors and a list of emergency phone numbers.
D Blisters | Small blisters heal best when left intact, because the skin covering them protects the raw area underneath from infection.
D CPR | Chest compressions in CPR are delivered at about 100 to 120 per minute, pressing hard and fast in the center of the chest.
D Sunburn relief | Cool showers and aloe gel soothe sunburned skin, and drinking extra water helps replace fluid lost through the damaged skin.
D Tick removal | A tick should be grasped close to the skin with fine-tipped tweezers and pulled straight out with steady, even pressure.
D Hypothermia | Hypothermia develops when the body loses heat faster than it can produce it; intense shivering and clumsiness are early signs.
D Swallowed chemicals | If someone swallows a household chemical, contact a poison control center before trying to make them vomit.

@laundry Laundry and stains
T Cold water washing | Washing clothes in cold water cleans most everyday loads well with modern detergents and saves energy, since heating water accounts for most of a washing machine's energy use. Hot water also shrinks and fades some fabrics.
? is cold water good enough to wash clothes
? why does washing in cold water save energy
T Blood stains | Treat blood stains with cold water, never hot, because heat sets the proteins into the fabric. Soak the stain, then dab it with a little hydrogen peroxide or an enzyme detergent on light fabrics.
? how do I get blood out of clothes
T Grease stains | Grease and oil stains lift best when dish soap is worked in before washing, since it breaks up fat. Check the stain before drying, as dryer heat makes oily marks permanent.
? how to remove oil stain from shirt
? should I put a stained shirt in the dryer
T Shrunken wool | Wool shrinks and felts when heat, agitation and moisture make its scaly fibers lock together. Hand washing in cool water and drying flat keep sweaters at their original size.
? why did my wool sweater shrink
T Dryer lint | Cleaning the lint filter after every dryer load improves drying speed and reduces fire risk, since lint is highly flammable. The exhaust duct should also be cleared about once a year.
? why should I clean the dryer lint trap every time
? can dryer lint cause a fire
T Musty towels | Towels smell musty when detergent and fabric softener residue trap bacteria. Using less detergent, skipping softener and occasionally washing hot with a cup of vinegar restores absorbency and freshness.
? why do my towels smell even after washing
T Color bleeding | New dark and brightly dyed clothes can release excess dye in the first few washes. Washing them separately in cold water, or adding a color-catcher sheet, prevents pink socks and gray whites.
? how do I stop colors from running in the wash
T Smelly washing machine | Front-loading washers can develop mildew in the rubber door seal. Wiping the seal, leaving the door ajar between loads and running a hot cleaning cycle monthly keeps odors away.
? why does my front load washer smell
? how do I clean the rubber seal on my washing machine
V Red wine stains | Blot fresh red wine with a cloth instead of rubbing, then rinse from the back with cold water; a paste of dish soap and hydrogen peroxide often lifts what remains on white fabrics.
? how do I get red wine out of a white shirt
V Ironing temperatures | Iron settings match fibers: synthetic fabrics like polyester need low heat, wool and silk medium heat, and cotton and linen the highest setting, usually with steam.
? what iron setting should I use for polyester
V Drying sweaters | Knitted sweaters should be dried flat on a towel rather than hung up, because the weight of the water pulls the fibers and stretches the shoulders out of shape.
? why shouldn't I hang sweaters to dry
D Detergent dosing | Using more detergent than recommended does not clean better and can leave a residue that attracts dirt back into the fabric.
D Care labels | Care labels use simple symbols: a tub means washing, a square means drying and a triangle refers to bleaching.
D Chlorine bleach | Chlorine bleach whitens cotton but damages wool, silk and spandex, and it must never be mixed with ammonia.
D Fabric softener | Fabric softener coats fibers with a thin waxy layer, which can reduce the absorbency of towels and sportswear.
D Sorting laundry | Sorting laundry by color, fabric weight and how dirty it is protects delicate items and keeps whites bright.
D Line drying | Sunlight naturally bleaches and freshens white cotton, which makes line drying a good option on warm, breezy days.
D Zippers | Closing zippers before washing keeps their metal teeth from snagging and tearing other garments in the drum.

@cleaning Cleaning chemistry
T Dangerous mixtures | Never mix bleach with ammonia-based cleaners or with acids such as vinegar: the combinations release toxic chloramine or chlorine gas. Use one product, rinse, and ventilate the room.
? can I mix bleach and vinegar
? what cleaning products are dangerous to mix
T Vinegar and limescale | White vinegar dissolves limescale and soap scum because its acetic acid reacts with calcium carbonate deposits. It should not be used on marble or granite, which it etches.
? how do I remove limescale from a shower head
? is vinegar safe on granite countertops
T Baking soda cleaning | Baking soda is a mild alkali and gentle abrasive, good for scrubbing sinks and neutralizing acidic odors in fridges and shoes. Mixed with vinegar it mostly fizzes into salty water and loses its cleaning power.
? does baking soda and vinegar actually clean
T Microfiber cloths | Microfiber cloths have split fibers far finer than cotton, which trap dust and grease mechanically, so they clean many surfaces with just water. Washing them with fabric softener clogs the fibers.
? why do microfiber cloths clean better
T Contact time | Disinfectant sprays need to stay wet on a surface for a contact time, often several minutes, to kill germs. Wiping immediately after spraying cleans the surface but may not disinfect it.
? how long should disinfectant sit before wiping
? why doesn't wiping right away kill germs
T Oven cleaning | Baked-on oven grease softens under a paste of baking soda and water left overnight. Self-cleaning cycles burn the residue to ash at very high temperatures but produce smoke and odors.
? how do I clean a greasy oven without harsh chemicals
T Bathroom mold | Bathroom mold grows where moisture lingers. Running the exhaust fan during and for twenty minutes after a shower, and squeegeeing the tiles, removes the dampness mold needs.
? how do I prevent mold in the bathroom
? why does black mold keep coming back on my shower grout
T Hardwood floors | Hardwood floors should be cleaned with a barely damp mop, because standing water seeps into the seams and makes boards swell and cup. Steam mops can damage the finish.
? can I use a steam mop on hardwood floors
V Stainless steel | Stainless steel should be wiped in the direction of the grain with a soft cloth; abrasive pads and chlorine cleaners can scratch it or cause rust spots.
? how do I clean stainless steel appliances without scratching
V Kitchen sponges | Kitchen sponges harbor huge numbers of bacteria; rinsing them, squeezing them dry and replacing them every week or two is more reliable than trying to sanitize them.
? how often should I replace a kitchen sponge
V Top to bottom | Cleaning a room from top to bottom saves work, because dust knocked off shelves and light fixtures falls to the floor, which is then vacuumed last.
? what order should I clean a room in
D Streaky windows | Streaky windows usually come from cleaning in direct sunlight, which dries the solution before it can be wiped away evenly.
D Enzyme cleaners | Enzyme cleaners break down organic stains such as urine, which is why they remove pet odors instead of just masking them.
D Rubbing alcohol | Isopropyl alcohol evaporates quickly without leaving residue, which makes it useful for cleaning electronics, glass and chrome.
D HEPA vacuums | HEPA filters in vacuum cleaners capture very fine particles, including pollen, pet dander and dust mite debris.
D Sealing grout | Grout is porous, so applying a sealer after a deep clean helps it resist stains and discoloration for longer.
D Disposal odors | Odors from a garbage disposal usually come from food trapped under the rubber splash guard, which can be scrubbed with an old toothbrush.
D Scrubbing pads | Green scrubbing pads can scratch nonstick coatings, so delicate pans should be cleaned with a soft sponge instead.

@plumbing Plumbing
T Clogged drains | For a slow drain, try a plunger or a plastic drain snake before chemical openers, which are caustic, can damage old pipes and are dangerous if you later need to plunge. Hair catchers prevent shower clogs.
? how do I unclog a drain without chemicals
? are chemical drain cleaners bad for pipes
T Running toilet | A toilet that keeps running usually has a worn flapper at the bottom of the tank that lets water leak into the bowl. Replacing the flapper is cheap, and a few drops of food coloring in the tank reveal the leak.
? why does my toilet keep running
T Frozen pipes | Pipes in unheated spaces can freeze and burst because water expands as it turns to ice. Letting a faucet drip on very cold nights and opening cabinet doors to let in warm air both help.
? how do I keep my pipes from freezing
? why do frozen pipes burst
T Main shutoff valve | Every household should know where the main water shutoff valve is, usually near where the water line enters the house or by the meter, so a burst pipe can be stopped in seconds.
? where is the main water shutoff valve in a house
T Water hammer | A loud bang when a faucet or washing machine valve closes suddenly is called water hammer, a pressure shock in the pipes. Arrestors installed near the valve absorb the surge.
? what is the banging noise in my pipes when I turn off the tap
T Faucet aerators | Low pressure at a single faucet often comes from a clogged aerator, the small screen at the tip of the spout. Unscrewing it and soaking it in vinegar usually restores the flow.
? why is the water pressure low in only one faucet
? how do I clean a faucet aerator
T Jammed disposal | A jammed garbage disposal can often be freed by switching it off and turning the blades from below with the hex key that fits the socket on the bottom. Grease and fibrous peels cause many jams.
? how do I fix a jammed garbage disposal
T Flushing the water heater | Draining a few buckets from a tank water heater once a year removes sediment that settles at the bottom, which otherwise causes rumbling noises and reduces efficiency.
? why does my water heater make popping noises
? how often should I flush my water heater
V Dripping faucets | A dripping faucet usually needs a new washer or cartridge, and a drip of one per second wastes thousands of liters of water a year.
? how much water does a dripping faucet waste
V Sewer gas smell | A rotten egg smell from a drain that is rarely used often means its trap has dried out; running water for a minute refills it and restores the seal against sewer gas.
? why does my basement floor drain smell like rotten eggs
V Toilet auger | When a plunger fails on a toilet, a closet auger with a protective sleeve can reach the clog without scratching the porcelain bowl.
? what to use when a plunger doesn't unclog a toilet
D PEX tubing | Many modern homes use PEX plastic tubing for water supply lines because it is flexible and tolerates freezing better than copper.
D Thread tape | PTFE thread tape wrapped clockwise around pipe threads helps seal threaded joints against slow leaks.
D Fill valve | The fill valve refills the toilet tank after each flush and shuts off automatically when the float rises.
D Hard water | Hard water contains dissolved calcium and magnesium, which leave scale on fixtures and reduce how well soap lathers.
D Sump pumps | A sump pump removes groundwater that collects in a basement pit and should be tested before the rainy season.
D Flushable wipes | So-called flushable wipes do not break down like toilet paper and are a common cause of sewer blockages.
D Meter leak test | If the water meter dial keeps moving while every tap in the house is off, there is a leak somewhere in the system.

@heating Heating, cooling and insulation
T Thermostat setback | Turning the thermostat down by several degrees for eight hours a day, such as overnight or while at work, can cut heating bills by several percent. A house does not need more energy to reheat than it saved.
? does turning down the heat at night save money
? is it cheaper to keep the heating on all day
T Finding drafts | Drafts around windows and doors can account for a large share of heat loss. Weatherstripping and door sweeps are inexpensive, and a lit incense stick held near gaps shows where air moves.
? how do I find drafts around my windows
T Attic insulation | Heat rises, so an under-insulated attic is often the biggest source of heat loss in a house. If the insulation sits level with or below the floor joists, adding more usually pays off.
? how do I know if my attic needs more insulation
? where does a house lose the most heat
T Furnace filters | A dirty air conditioner or furnace filter restricts airflow, making the system work harder and heat or cool less evenly. Most filters should be checked monthly and replaced every one to three months.
? how often should I change my furnace filter
T Ceiling fans | Ceiling fans cool people, not rooms, by moving air over the skin, so turn them off in empty rooms. In winter, reversing the rotation at low speed pushes warm air down from the ceiling.
? does a ceiling fan cool the room
? which direction should a ceiling fan spin in winter
T Heat pumps | A heat pump moves heat instead of generating it, pulling warmth from outdoor air even in cold weather, so it can deliver two to four units of heat for each unit of electricity used.
? how does a heat pump heat a house when it's cold outside
T Window condensation | Water collecting on the inside of windows in winter means the indoor air is humid and the glass is cold. Ventilating after showers and cooking and running extractor fans reduce the moisture.
? why do my windows have water on the inside in winter
? how do I stop condensation on windows
T Bleeding radiators | A radiator that is cold at the top and warm at the bottom has trapped air. Bleeding it with a radiator key lets the air escape until water appears, restoring full heat.
? why is my radiator cold at the top
V Thermal curtains | Thick curtains closed at dusk trap a layer of air against the window and reduce heat loss, while opening them on sunny winter days lets in free solar heat.
? do thermal curtains help keep a room warm
V Oversized air conditioners | An oversized air conditioner cools a room quickly but switches off before removing much moisture, leaving the air cold and clammy; a correctly sized unit runs longer cycles and dehumidifies better.
? why does my air conditioner make the room feel damp
V Carbon monoxide detectors | Fuel-burning furnaces, boilers and water heaters can leak carbon monoxide, an odorless gas, so detectors should be installed near bedrooms and on every floor.
? where should carbon monoxide detectors be placed
D Smart thermostats | Smart thermostats learn schedules and can be adjusted from a phone, but the savings depend on actually setting back temperatures.
D Double glazing | Double-glazed windows have two panes of glass with a gas-filled gap between them that slows the transfer of heat.
D Space heater clearance | Space heaters need at least a meter of clearance from curtains, bedding and furniture to avoid starting a fire.
D R-value | The R-value measures how well an insulation material resists heat flow; the higher the number, the better it insulates.
D Humidifiers | Indoor winter air is often very dry, and a humidifier can ease dry skin and static shocks as long as it is kept clean.
D Chimney inspection | Wood-burning chimneys should be inspected every year because creosote deposits on the flue walls can ignite.
D Sun-facing rooms | Rooms facing the midday sun warm up naturally in winter and may overheat in summer unless they have shading.

@pets Pets
T Chocolate and dogs | Chocolate contains theobromine, which dogs metabolize very slowly; dark and baking chocolate are the most dangerous kinds. Vomiting, restlessness and a racing heart after eating chocolate warrant a call to a vet.
? why is chocolate bad for dogs
? what kind of chocolate is most dangerous for dogs
T Purring | Cats purr by rapidly twitching muscles in the larynx as they breathe. They purr when content, but also when stressed, injured or giving birth, possibly as a way to soothe themselves.
? why do cats purr
T Panting | Dogs cool themselves mainly by panting, since they sweat only through their paw pads. Parked cars become dangerous within minutes on a warm day, even with the windows cracked.
? how do dogs cool down
? is it safe to leave a dog in the car with windows open
T Litter boxes | Cats may avoid a dirty litter box or one placed in a noisy spot. A common guideline is one box per cat plus one extra, scooped daily and set in quiet, easy-to-reach places.
? why is my cat peeing outside the litter box
T Grapes and raisins | Grapes and raisins can cause sudden kidney failure in some dogs, even in small amounts, and why some dogs react while others do not is still not fully understood.
? can dogs eat grapes
T Cycling a fish tank | A new aquarium needs several weeks to grow bacteria that convert toxic ammonia from fish waste into less harmful nitrate. Adding many fish to an uncycled tank often kills them.
? why did my new aquarium fish die
? what does cycling a fish tank mean
T Nail trimming | Dog nails that click on the floor are too long. Trim small amounts at a time to avoid the quick, the blood vessel inside the nail, which is easier to see in light-colored nails.
? how often should I trim my dog's nails
T Scratching posts | Scratching is normal cat behavior that sharpens claws and marks territory. A sturdy, tall scratching post placed near the furniture the cat already targets redirects the habit.
? how do I stop my cat from scratching the sofa
? why do cats scratch furniture
V Teething puppies | Puppies lose their baby teeth between about three and six months of age, and chewing relieves their sore gums; offering safe chew toys protects shoes and furniture.
? why is my puppy chewing everything
V Cats and water | Many cats drink more from moving water, so a pet fountain or a wide, shallow bowl placed away from the food can help them stay hydrated.
? how can I get my cat to drink more water
V Rabbit diet | Pet rabbits need unlimited hay, which wears down their continuously growing teeth and keeps their digestion moving; pellets and vegetables should be a smaller part of the diet.
? what should I feed a pet rabbit
D Daily walks | Most dogs need at least one or two walks a day, and energetic working breeds require far more exercise than that.
D Cat sleep | Cats sleep twelve to sixteen hours a day, with short bursts of activity that peak around dawn and dusk.
D Flea control | Fleas can live in carpets and bedding, so treating the home as well as the pet prevents a new infestation.
D Microchips | A microchip holds an identification number that shelters and vets can scan to reunite lost pets with their owners.
D Tail wagging | A wagging tail does not always mean a friendly dog; a stiff, high wag can signal tension or alertness.
D Hamsters | Hamsters are nocturnal animals and may bite if they are woken abruptly during the day.
D Xylitol | The sweetener xylitol, found in some sugar-free gum, causes a dangerous drop in blood sugar in dogs.

@nightsky Night sky
T Moon phases | The Moon's phases come from how much of its sunlit half we see as it orbits Earth every 29.5 days. Earth's shadow has nothing to do with phases; that only happens during a lunar eclipse.
? why does the moon have phases
? is the crescent moon caused by earth's shadow
T Shooting stars | Shooting stars are small bits of space dust burning up in the upper atmosphere at tens of kilometers per second. Meteor showers happen when Earth passes through debris left behind by a comet.
? what is a shooting star
T Planets and stars | Planets usually shine with a steady light, while stars twinkle, because a star is a single point whose light is bent by turbulent air. Venus and Jupiter are often the brightest objects after the Moon.
? how can I tell a planet from a star in the sky
? what is the bright star near the moon
T Dark adaptation | Eyes need twenty to thirty minutes in darkness to fully adapt for stargazing. A red flashlight preserves night vision, while a glance at a white phone screen resets it.
? why do astronomers use red flashlights
T Light pollution | Light pollution from cities hides all but the brightest stars; at a truly dark site thousands of stars and the Milky Way are visible with the naked eye.
? why can't I see many stars in the city
? where can I see the milky way
T Satellites | A steady dot of light crossing the sky in a few minutes without blinking is usually a satellite reflecting sunlight, most visible in the hour or two after sunset.
? what is the moving light in the night sky that doesn't blink
T Binoculars | Ordinary binoculars such as 7x50 or 10x50 models are a good first stargazing tool, showing moon craters, Jupiter's moons and star clusters with a wide, easy view.
? are binoculars good for stargazing
T Eclipse safety | Looking at the Sun during a partial solar eclipse can permanently damage the retina; only certified eclipse glasses or pinhole projection are safe. Normal sunglasses are not enough.
? can I watch a solar eclipse with sunglasses
? how do I safely view an eclipse
V Supermoons | A supermoon is a full moon near the closest point of the Moon's elliptical orbit, appearing up to about 14 percent larger and noticeably brighter than when it is farthest away.
? what is a supermoon
V Moon illusion | The Moon looks larger near the horizon than high in the sky, but photographs show its size is the same; the effect is an illusion created by the brain.
? why does the moon look bigger near the horizon
V North Star | Polaris, the North Star, sits almost directly above Earth's north pole, so it stays nearly fixed while other stars circle around it, making it useful for finding north.
? how do I find north using the stars
D Constellations | Constellations are patterns of stars that appear close together from Earth but are often at very different distances from us.
D Auroras | Auroras appear when charged particles from the Sun strike gases in the upper atmosphere, mostly near the poles.
D Telescope aperture | A telescope's aperture, the diameter of its main lens or mirror, determines how much faint detail it can gather.
D Star colors | Red stars are cooler than blue stars, so the color of a star reveals the temperature of its surface.
D Phases of Venus | Through a telescope Venus shows phases like the Moon, because it orbits the Sun closer than Earth does.
D Space station | The International Space Station circles Earth about every 90 minutes at an altitude of around 400 kilometers.
D Seasons | Seasons are caused by the tilt of Earth's axis, not by changes in Earth's distance from the Sun during the year.
"""


@dataclass
class Passage:
    family: str
    title: str
    text: str
    questions: list[str] = field(default_factory=list)


@dataclass
class Family:
    key: str
    name: str
    train: list[Passage] = field(default_factory=list)
    dev: list[Passage] = field(default_factory=list)
    distractors: list[Passage] = field(default_factory=list)


def parse_knowledge_base(block: str = KNOWLEDGE_BASE) -> list[Family]:
    families: list[Family] = []
    last: Passage | None = None
    for lineno, raw in enumerate(block.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        tag, _, rest = line.partition(" ")
        if tag.startswith("@"):
            families.append(Family(key=tag[1:], name=rest.strip()))
            last = None
        elif tag in ("T", "V", "D"):
            title, sep, text = rest.partition(" | ")
            if not sep:
                raise ValueError(f"line {lineno}: expected 'title | text'")
            last = Passage(families[-1].key, title.strip(), text.strip())
            {"T": families[-1].train, "V": families[-1].dev, "D": families[-1].distractors}[tag].append(last)
        elif tag == "?":
            if last is None:
                raise ValueError(f"line {lineno}: question without a passage")
            last.questions.append(rest.strip())
        else:
            raise ValueError(f"line {lineno}: unknown tag {tag!r}")
    for fam in families:
        for p in fam.train:
            assert 1 <= len(p.questions) <= 2, (fam.key, p.title)
        for p in fam.dev:
            assert len(p.questions) == 1, (fam.key, p.title)
        for p in fam.distractors:
            assert not p.questions, (fam.key, p.title)
    return families


def build_ir(families: list[Family], rng: random.Random):
    """Return (train_records, corpus, queries, qrels)."""
    train: list[dict] = []
    for fam in families:
        for p in fam.train:
            others = [o.text for o in fam.train if o is not p]
            for q in p.questions:
                k = rng.choice((3, 4))
                train.append({"query": q, "positives": [p.text], "negatives": rng.sample(others, k)})
    rng.shuffle(train)

    docs = [p for fam in families for p in fam.dev + fam.distractors]
    rng.shuffle(docs)
    doc_id = {id(p): f"d{i:03d}" for i, p in enumerate(docs, 1)}
    corpus = [{"_id": doc_id[id(p)], "title": p.title, "text": p.text} for p in docs]

    dev_passages = [p for fam in families for p in fam.dev]
    rng.shuffle(dev_passages)
    queries, qrels = [], []
    for i, p in enumerate(dev_passages, 1):
        qid = f"q{i:03d}"
        queries.append({"_id": qid, "text": p.questions[0]})
        qrels.append((qid, doc_id[id(p)], 1))
    return train, corpus, queries, qrels


# ----------------------------------------------------------------------------------------------
# STS scene frames
# ----------------------------------------------------------------------------------------------
# Each slot value is a tuple of interchangeable surface forms. ``minor`` slots are details whose
# change leaves the gist intact; ``major`` slots carry the main information.

@dataclass
class Frame:
    name: str
    topic: str
    domain: str
    forms: list[str]
    negs: list[str]
    slots: dict[str, list[tuple[str, ...]]]
    minor: list[str]
    major: list[str]


def F(name, topic, domain, forms, negs, slots, minor, major):
    return Frame(name, topic, domain, forms, negs, slots, minor, major)


WHO_A = [("my grandmother", "my grandma"), ("the chef",), ("Tom",), ("our neighbor", "the woman next door")]

STS_FRAMES_TRAIN = [
    # ---- home / kitchen
    F("bake", "kitchen", "home",
      ["{who} baked {what} for {occasion}.", "{who} made {what} in the oven for {occasion}.",
       "For {occasion}, {who} baked {what}."],
      ["{who} did not bake {what} for {occasion}.", "For {occasion}, {who} decided against baking {what}."],
      {"who": WHO_A,
       "what": [("a loaf of rye bread", "a rye loaf"), ("two dozen cookies", "twenty-four cookies"),
                ("an apple pie",), ("a lemon cake",)],
       "occasion": [("the school fair", "the fair at the school"), ("Sunday dinner", "dinner on Sunday"),
                    ("a friend's birthday", "the birthday of a friend"), ("the office party", "the party at work")]},
      ["occasion"], ["what", "who"]),
    F("chop", "kitchen", "home",
      ["{who} chopped {veg} {how} and added them to the soup.",
       "{who} cut {veg} {how} before putting them in the soup.",
       "Before they went into the soup, {who} chopped {veg} {how}."],
      ["{who} added {veg} to the soup without chopping them.", "{who} did not chop {veg} for the soup."],
      {"who": [("the cook",), ("Anna",), ("my uncle",)],
       "veg": [("the onions",), ("the carrots",), ("three potatoes",), ("the celery sticks", "the sticks of celery")],
       "how": [("finely", "into tiny pieces"), ("roughly", "into big chunks"), ("into thin slices", "thinly")]},
      ["how"], ["veg", "who"]),
    F("simmer", "kitchen", "home",
      ["Let {dish} simmer on low heat for {time}.", "{dish} should cook gently over low heat for {time}.",
       "Keep {dish} at a low simmer for {time}."],
      ["Do not let {dish} simmer for {time}.", "{dish} should not be left on the heat for {time}."],
      {"dish": [("the tomato sauce",), ("the bean stew", "the stew of beans"), ("the chicken broth", "the chicken stock"),
                ("the lentil soup",)],
       "time": [("twenty minutes", "20 minutes"), ("half an hour", "thirty minutes"), ("an hour", "sixty minutes"),
                ("ten minutes",)]},
      ["time"], ["dish"]),
    # ---- home / housework
    F("vacuum", "housework", "home",
      ["{who} vacuumed the {room} {when}.", "{who} ran the vacuum cleaner in the {room} {when}.",
       "The {room} was vacuumed by {who} {when}."],
      ["{who} did not vacuum the {room} {when}.", "{who} skipped vacuuming the {room} {when}."],
      {"who": [("my sister",), ("the cleaner", "the cleaning lady"), ("Jamal",)],
       "room": [("living room", "lounge"), ("bedroom",), ("hallway", "hall"), ("stairs", "staircase")],
       "when": [("this morning", "earlier this morning"), ("on Saturday",), ("before the guests arrived", "before the visitors came")]},
      ["when"], ["room", "who"]),
    F("appliance", "housework", "home",
      ["The {appliance} stopped working {when}.", "The {appliance} broke down {when}.",
       "{when}, the {appliance} quit working."],
      ["The {appliance} was working perfectly {when}.", "Nothing was wrong with the {appliance} {when}."],
      {"appliance": [("washing machine", "washer"), ("dishwasher",), ("fridge", "refrigerator"),
                     ("microwave", "microwave oven")],
       "when": [("yesterday",), ("last week", "a week ago"), ("this morning",), ("on Monday night",)]},
      ["when"], ["appliance"]),
    F("repair", "housework", "home",
      ["{who} fixed the {thing} with {tool}.", "{who} repaired the {thing} using {tool}.",
       "Using {tool}, {who} mended the {thing}."],
      ["{who} could not fix the {thing} with {tool}.", "{who} tried {tool}, but the {thing} stayed broken."],
      {"who": [("my dad", "my father"), ("the landlord",), ("Lena",)],
       "thing": [("leaking tap", "dripping faucet"), ("wobbly chair", "unsteady chair"), ("broken shelf",),
                 ("squeaky door", "creaking door")],
       "tool": [("a screwdriver",), ("some glue", "a bit of glue"), ("duct tape", "some duct tape"), ("a wrench", "a spanner")]},
      ["tool"], ["thing", "who"]),
    # ---- outdoors / garden
    F("plant", "garden", "outdoors",
      ["{who} planted {plants} along the {place} {when}.", "{when}, {who} planted {plants} along the {place}.",
       "{plants} were planted along the {place} by {who} {when}."],
      ["{who} did not plant {plants} along the {place} {when}.", "{who} gave up on planting {plants} along the {place} {when}."],
      {"who": [("my mother", "my mom"), ("the gardener",), ("the kids", "the children")],
       "plants": [("sunflowers",), ("tulip bulbs",), ("rose bushes", "roses"), ("strawberry plants",)],
       "place": [("fence", "garden fence"), ("driveway",), ("path", "footpath")],
       "when": [("in April", "during April"), ("last spring", "in the spring last year"), ("yesterday",)]},
      ["when", "place"], ["plants", "who"]),
    F("needs", "garden", "outdoors",
      ["The {plant} needs {light} and {water}.", "The {plant} grows best with {light} and {water}.",
       "For the {plant}, {light} and {water} work best."],
      ["The {plant} does poorly with {light} and {water}.", "{light} and {water} are bad for the {plant}."],
      {"plant": [("lemon tree",), ("lavender", "lavender bush"), ("fern", "potted fern"), ("tomato plant",)],
       "light": [("full sun", "lots of direct sun"), ("partial shade", "some shade"), ("bright indirect light",)],
       "water": [("little water", "only a little water"), ("regular watering", "frequent watering")]},
      ["water"], ["plant", "light"]),
    F("mow", "garden", "outdoors",
      ["{who} mowed the lawn {when} since {reason}.", "Because {reason}, {who} cut the grass {when}.",
       "{who} cut the grass {when} because {reason}."],
      ["{who} did not mow the lawn {when}, even though {reason}.", "Although {reason}, {who} left the lawn uncut {when}."],
      {"who": [("my brother",), ("the boy next door", "the neighbor's son"), ("Grandpa", "my grandfather")],
       "when": [("on Saturday morning", "early on Saturday"), ("after work", "once work was over"), ("on Sunday afternoon",)],
       "reason": [("rain was forecast", "rain was expected"), ("guests were coming", "visitors were on their way"),
                  ("the grass had grown very long", "the grass was getting really long")]},
      ["when"], ["reason", "who"]),
    # ---- outdoors / weather
    F("forecast", "weather", "outdoors",
      ["Forecasters expect {kind} in {region} {when}.", "The forecast calls for {kind} in {region} {when}.",
       "{when}, {region} will probably get {kind}."],
      ["The forecast does not call for {kind} in {region} {when}.", "{region} should stay free of {kind} {when}."],
      {"kind": [("heavy rain", "downpours"), ("strong winds", "gales"), ("thick fog", "dense fog"), ("snow", "snowfall")],
       "region": [("the north", "the northern region"), ("the coastal towns", "the towns along the coast"), ("the valley",)],
       "when": [("tomorrow",), ("on Friday",), ("over the weekend", "this weekend")]},
      ["when"], ["kind", "region"]),
    F("temperature", "weather", "outdoors",
      ["The temperature in {place} dropped to {temp} {when}.", "{when}, the temperature in {place} fell to {temp}.",
       "It got as cold as {temp} in {place} {when}."],
      ["The temperature in {place} did not drop to {temp} {when}.", "It stayed warmer than {temp} in {place} {when}."],
      {"place": [("the mountains", "the mountain villages"), ("the city", "town"), ("the harbor",)],
       "temp": [("minus five degrees", "-5 degrees"), ("two degrees below zero", "minus two degrees"),
                ("zero degrees", "0 degrees")],
       "when": [("last night", "overnight"), ("on Tuesday",), ("just before sunrise", "right before dawn")]},
      ["temp", "when"], ["place"]),
    F("outage", "weather", "outdoors",
      ["A thunderstorm knocked out power in {place} for {duration}.",
       "{place} lost power for {duration} because of a thunderstorm.",
       "Power in {place} was out for {duration} after a thunderstorm."],
      ["Despite the thunderstorm, {place} never lost power.", "The thunderstorm did not cause a power cut in {place}."],
      {"place": [("our neighborhood", "our part of town"), ("the whole village", "the entire village"),
                 ("the downtown area", "downtown")],
       "duration": [("three hours", "3 hours"), ("most of the night", "nearly all night"), ("two days", "48 hours")]},
      ["duration"], ["place"]),
    # ---- city / commute
    F("delay", "commute", "city",
      ["The {train} to {city} was delayed by {delay}.", "The {train} to {city} ran {delay} late.",
       "There was a delay of {delay} on the {train} to {city}."],
      ["The {train} to {city} left right on time.", "The {train} to {city} was not delayed at all."],
      {"train": [("morning train", "early train"), ("night bus", "overnight bus"), ("express train", "express")],
       "city": [("Lyon",), ("the airport",), ("Boston",)],
       "delay": [("twenty minutes", "20 minutes"), ("almost an hour", "nearly an hour"), ("ten minutes",)]},
      ["delay"], ["city", "train"]),
    F("bike_commute", "commute", "city",
      ["{who} rides a bike to work {freq}.", "{who} cycles to the office {freq}.",
       "{freq}, {who} goes to work by bicycle."],
      ["{who} never rides a bike to work.", "{who} does not cycle to the office {freq}."],
      {"who": [("my colleague", "my coworker"), ("the manager",), ("Omar",)],
       "freq": [("every day", "daily"), ("three times a week", "three days a week"),
                ("when the weather is nice", "whenever the weather is good")]},
      ["freq"], ["who"]),
    F("booking", "commute", "city",
      ["{who} booked a {trip} to {dest} for {when}.", "{who} reserved a {trip} to {dest} for {when}.",
       "For {when}, {who} booked a {trip} to {dest}."],
      ["{who} cancelled the {trip} to {dest} for {when}.", "{who} did not book a {trip} to {dest} for {when}."],
      {"who": [("my parents", "my mom and dad"), ("the team",), ("Elena",)],
       "trip": [("flight",), ("train ticket", "rail ticket"), ("ferry crossing", "ferry trip")],
       "dest": [("Lisbon",), ("Oslo",), ("the coast",)],
       "when": [("next Monday",), ("early June", "the beginning of June"), ("the holidays", "the holiday season")]},
      ["when"], ["dest", "trip"]),
    # ---- city / shopping
    F("buy", "shopping", "city",
      ["{who} bought {item} at the {store} for {price}.", "{who} paid {price} for {item} at the {store}.",
       "At the {store}, {who} picked up {item} for {price}."],
      ["{who} did not buy {item} at the {store}.", "{who} left the {store} without buying {item}."],
      {"who": [("my friend",), ("Jake",), ("the student",)],
       "item": [("a winter coat", "a warm coat for winter"), ("new running shoes", "a new pair of running shoes"),
                ("a secondhand bicycle", "a used bike"), ("a wooden bookshelf",)],
       "store": [("market", "local market"), ("mall", "shopping mall"), ("thrift shop", "charity shop")],
       "price": [("forty dollars", "$40"), ("twelve euros", "12 euros"), ("half price", "half the usual price")]},
      ["price", "store"], ["item"]),
    F("opening", "shopping", "city",
      ["The {shop} on {street} opens at {time} on weekdays.", "On weekdays, the {shop} on {street} opens at {time}.",
       "The {shop} on {street} opens its doors at {time} on weekdays."],
      ["The {shop} on {street} is closed on weekdays.", "The {shop} on {street} does not open at {time} on weekdays."],
      {"shop": [("bakery",), ("pharmacy", "chemist"), ("hardware store",), ("post office",)],
       "street": [("Main Street",), ("Elm Road",), ("the market square", "the square")],
       "time": [("seven in the morning", "7 a.m."), ("half past eight", "8:30"), ("nine o'clock", "9 a.m.")]},
      ["time", "street"], ["shop"]),
    F("return", "shopping", "city",
      ["{who} returned the {item} because it was {problem}.",
       "{who} took the {item} back to the store since it was {problem}.",
       "Because it was {problem}, {who} returned the {item}."],
      ["{who} kept the {item} even though it was {problem}.", "{who} did not return the {item}, although it was {problem}."],
      {"who": [("my wife",), ("the customer",), ("Daniel",)],
       "item": [("blender",), ("jacket",), ("lamp", "desk lamp"), ("backpack", "rucksack")],
       "problem": [("too small", "a size too small"), ("broken", "damaged"), ("the wrong color", "not the right color")]},
      ["who"], ["item", "problem"]),
    # ---- tech / phones
    F("drain", "phones", "tech",
      ["Since the last update, the battery on {device} drains {speed}.",
       "The battery on {device} has been running down {speed} since the last update.",
       "After the last update, {device} loses charge {speed}."],
      ["The last update has not changed how fast the battery on {device} drains.",
       "Since the last update, the battery on {device} lasts as long as before."],
      {"device": [("my phone", "my smartphone"), ("the tablet",), ("my smartwatch", "my watch")],
       "speed": [("much faster", "far more quickly"), ("a bit faster", "slightly more quickly")]},
      ["speed"], ["device"]),
    F("crack", "phones", "tech",
      ["{who} cracked the screen of the {device} by dropping it {where}.",
       "{who} dropped the {device} {where} and cracked its screen.",
       "The screen of the {device} cracked when {who} dropped it {where}."],
      ["{who} dropped the {device} {where}, but the screen did not crack.",
       "The {device} survived being dropped {where} by {who} without a scratch."],
      {"who": [("my little brother", "my younger brother"), ("the intern",), ("Aisha",)],
       "device": [("phone", "mobile phone"), ("tablet",), ("e-reader", "e-book reader")],
       "where": [("on the stairs", "on the staircase"), ("in the parking lot", "in the car park"),
                 ("on the bathroom tiles", "on the tiled bathroom floor")]},
      ["where"], ["device", "who"]),
    F("power_mode", "phones", "tech",
      ["Turning on {mode} can extend your phone's battery life by {amount}.",
       "Your phone's battery can last {amount} longer with {mode} switched on.",
       "Switching on {mode} can add {amount} to your phone's battery life."],
      ["Turning on {mode} does not noticeably extend your phone's battery life.",
       "{mode} makes no real difference to how long your phone's battery lasts."],
      {"mode": [("low power mode", "battery saver mode"), ("dark mode", "the dark theme"), ("airplane mode", "flight mode")],
       "amount": [("a few hours", "several hours"), ("about 20 percent", "roughly a fifth"), ("up to a day", "as much as a full day")]},
      ["amount"], ["mode"]),
    # ---- tech / computers
    F("install", "computers", "tech",
      ["{who} installed {software} on the {computer} {when}.", "{when}, {who} put {software} on the {computer}.",
       "{software} was installed on the {computer} by {who} {when}."],
      ["{who} did not install {software} on the {computer} {when}.",
       "{who} forgot to install {software} on the {computer} {when}."],
      {"who": [("the IT technician", "the IT guy"), ("my son",), ("Yuki",)],
       "software": [("a new web browser", "a different browser"), ("the latest security update", "the newest security patch"),
                    ("a photo editing program", "photo editing software")],
       "computer": [("office computer", "work computer"), ("family laptop", "laptop the family shares"), ("school tablets",)],
       "when": [("yesterday",), ("over the weekend", "during the weekend"), ("last month",)]},
      ["when"], ["software", "computer"]),
    F("boot", "computers", "tech",
      ["The {computer} takes {time} to start up {when}.", "{when}, it takes {time} for the {computer} to boot.",
       "Starting up the {computer} takes {time} {when}."],
      ["The {computer} does not take {time} to start up {when}.", "{when}, the {computer} no longer needs {time} to boot."],
      {"computer": [("old desktop", "old desktop computer"), ("school laptop",), ("gaming PC", "gaming computer")],
       "time": [("almost five minutes", "nearly five minutes"), ("about ten seconds", "roughly ten seconds"),
                ("over two minutes", "more than two minutes")],
       "when": [("these days", "nowadays"), ("since the update", "ever since the update"), ("in the mornings", "every morning")]},
      ["when"], ["time", "computer"]),
    F("backup", "computers", "tech",
      ["{who} backed up {files} to {dest}.", "{who} made a backup of {files} on {dest}.",
       "{files} were backed up to {dest} by {who}."],
      ["{who} never backed up {files} to {dest}.", "{who} did not make a backup of {files} on {dest}."],
      {"who": [("my father-in-law",), ("the office manager",), ("Hannah",)],
       "files": [("all the family photos", "all of the family photos"), ("the project files", "the files for the project"),
                 ("ten years of emails", "a decade of emails")],
       "dest": [("an external hard drive", "an external drive"), ("the cloud", "cloud storage"), ("a USB stick", "a flash drive")]},
      ["dest"], ["files", "who"]),
]

STS_FRAMES_DEV = [
    # ---- home / kitchen
    F("spill", "kitchen", "home",
      ["{who} spilled {liquid} all over the kitchen floor {when}.", "{when}, {who} spilled {liquid} all over the kitchen floor.",
       "{liquid} ended up all over the kitchen floor when {who} knocked it over {when}."],
      ["{who} did not spill {liquid} on the kitchen floor {when}.", "{who} managed not to spill {liquid} {when}."],
      {"who": [("the toddler", "the little boy"), ("my roommate", "my flatmate"), ("the waiter",)],
       "liquid": [("a jug of milk", "a pitcher of milk"), ("a bottle of olive oil",), ("a pot of coffee", "a whole pot of coffee")],
       "when": [("this morning", "earlier this morning"), ("last night", "yesterday evening"), ("during breakfast", "at breakfast")]},
      ["when"], ["liquid", "who"]),
    F("recipe", "kitchen", "home",
      ["The recipe calls for {qty} of {ingredient}.", "You need {qty} of {ingredient} for this recipe.",
       "This recipe uses {qty} of {ingredient}."],
      ["The recipe does not call for {qty} of {ingredient}.", "This recipe does not use any {ingredient}."],
      {"qty": [("two cups", "2 cups"), ("half a teaspoon", "1/2 teaspoon"), ("three tablespoons", "3 tablespoons")],
       "ingredient": [("flour",), ("brown sugar",), ("grated cheese", "shredded cheese"), ("chopped walnuts",)]},
      ["qty"], ["ingredient"]),
    # ---- home / housework
    F("paint", "housework", "home",
      ["{who} painted the {surface} {color} over the weekend.", "Over the weekend, {who} painted the {surface} {color}.",
       "{who} gave the {surface} a coat of {color} paint over the weekend."],
      ["{who} did not paint the {surface} {color} over the weekend.", "{who} decided against painting the {surface} {color}."],
      {"who": [("the couple next door", "our neighbors"), ("Sam",), ("my aunt",)],
       "surface": [("garden fence", "fence in the garden"), ("kitchen walls", "walls of the kitchen"), ("front door",)],
       "color": [("white",), ("pale blue", "light blue"), ("dark green",)]},
      ["color"], ["surface", "who"]),
    F("bins", "housework", "home",
      ["Please take out the {bin} before {time}.", "Remember to put out the {bin} before {time}.",
       "The {bin} has to go out before {time}."],
      ["There is no need to take out the {bin} before {time}.", "Leave the {bin} inside until after {time}."],
      {"bin": [("recycling bin", "recycling"), ("trash", "garbage"), ("compost bin", "food waste bin")],
       "time": [("eight o'clock", "8 a.m."), ("Thursday morning",), ("the truck arrives", "the collection truck comes")]},
      ["time"], ["bin"]),
    # ---- outdoors / garden
    F("pests", "garden", "outdoors",
      ["{who} found {pest} on the {plant} {when}.", "{when}, {who} discovered {pest} on the {plant}.",
       "{who} noticed {pest} all over the {plant} {when}."],
      ["{who} found no {pest} on the {plant} {when}.", "There were no {pest} on the {plant} when {who} checked {when}."],
      {"who": [("the farmer",), ("Jonas",), ("my grandmother",)],
       "pest": [("aphids", "tiny green aphids"), ("caterpillars",), ("snails", "garden snails")],
       "plant": [("bean plants",), ("cabbages",), ("lettuce seedlings", "young lettuce")],
       "when": [("this morning",), ("on Monday",), ("after the rain", "once the rain stopped")]},
      ["when"], ["pest", "plant"]),
    F("leaves", "garden", "outdoors",
      ["The {tree} in the {place} lost its leaves {when}.", "{when}, the {tree} in the {place} dropped its leaves.",
       "The {tree} in the {place} shed all its leaves {when}."],
      ["The {tree} in the {place} kept its leaves {when}.", "The {tree} in the {place} did not lose its leaves {when}."],
      {"tree": [("old oak", "old oak tree"), ("maple",), ("cherry tree",)],
       "place": [("park",), ("front yard", "front garden"), ("schoolyard",)],
       "when": [("early this year", "earlier than usual this year"), ("in October", "during October"), ("after the storm",)]},
      ["when", "place"], ["tree"]),
    # ---- outdoors / weather
    F("drought", "weather", "outdoors",
      ["It has not rained in {place} for {duration}.", "{place} has gone {duration} without rain.",
       "There has been no rainfall in {place} for {duration}."],
      ["It has rained in {place} every day for {duration}.", "{place} has had rain almost daily for {duration}."],
      {"place": [("the south", "the southern region"), ("our town",), ("the island",)],
       "duration": [("six weeks", "a month and a half"), ("almost a month", "nearly four weeks"), ("ten days",)]},
      ["duration"], ["place"]),
    F("caught", "weather", "outdoors",
      ["{who} got caught in a {storm} on the way {dest}.", "On the way {dest}, {who} was caught in a {storm}.",
       "A {storm} surprised {who} on the way {dest}."],
      ["{who} avoided the {storm} on the way {dest}.", "{who} got {dest} before the {storm} started."],
      {"who": [("my cousin",), ("the mail carrier", "the postman"), ("Priya",)],
       "storm": [("sudden downpour", "sudden cloudburst"), ("snowstorm", "blizzard"), ("hailstorm",)],
       "dest": [("home",), ("to school",), ("to the station", "to the train station")]},
      ["dest"], ["storm", "who"]),
    # ---- city / commute
    F("traffic", "commute", "city",
      ["Traffic on the {road} was backed up for {dist} because of {cause}.",
       "Because of {cause}, traffic on the {road} was backed up for {dist}.",
       "{cause} left traffic on the {road} backed up for {dist}."],
      ["Traffic on the {road} moved freely despite {cause}.", "{cause} did not slow down traffic on the {road}."],
      {"road": [("highway", "motorway"), ("bridge",), ("ring road", "beltway")],
       "dist": [("five kilometers", "5 km"), ("several miles", "a few miles"), ("two kilometers",)],
       "cause": [("an accident", "a crash"), ("roadworks", "road construction"), ("a broken-down truck", "a truck that had broken down")]},
      ["dist"], ["cause"]),
    F("last_bus", "commute", "city",
      ["{who} missed the last bus {when} and had to {how}.", "Having missed the last bus {when}, {who} had to {how}.",
       "{when}, {who} missed the final bus and needed to {how}."],
      ["{who} caught the last bus {when} and did not need to {how}.", "{who} made the last bus {when}, so there was no need to {how}."],
      {"who": [("my nephew",), ("the night nurse",), ("Chloe",)],
       "when": [("on Friday night",), ("after the concert", "once the concert ended"), ("yesterday",)],
       "how": [("walk home", "go home on foot"), ("take a taxi home", "get a cab home"), ("ask a friend for a ride", "ask a friend for a lift")]},
      ["when"], ["how", "who"]),
    # ---- city / shopping
    F("discount", "shopping", "city",
      ["The supermarket is offering {disc} on {product} this week.", "This week the supermarket has {disc} on {product}.",
       "There is {disc} on {product} at the supermarket this week."],
      ["The supermarket has no discount on {product} this week.", "The supermarket is not offering {disc} on {product} this week."],
      {"disc": [("a 20 percent discount", "a twenty percent discount"), ("a two-for-one deal", "a buy-one-get-one-free offer"),
                ("a 30 percent discount", "a thirty percent discount")],
       "product": [("strawberries", "fresh strawberries"), ("coffee beans", "bags of coffee beans"), ("olive oil", "bottles of olive oil")]},
      ["disc"], ["product"]),
    F("queue", "shopping", "city",
      ["{who} waited in line for {dur} to buy {item}.", "To buy {item}, {who} stood in line for {dur}.",
       "{who} queued for {dur} to get {item}."],
      ["{who} did not have to wait in line to buy {item}.", "{who} bought {item} without queuing at all."],
      {"who": [("the twins",), ("Marco",), ("my boss", "my manager")],
       "item": [("concert tickets", "tickets for the concert"), ("the new phone", "the newly released phone"),
                ("fresh bread", "freshly baked bread")],
       "dur": [("an hour", "sixty minutes"), ("two hours",), ("forty-five minutes", "three quarters of an hour")]},
      ["dur"], ["item", "who"]),
    # ---- tech / phones
    F("left_device", "phones", "tech",
      ["{who} accidentally left {device} {where} {when}.", "{when}, {who} forgot {device} {where}.",
       "{device} was left behind {where} by {who} {when}."],
      ["{who} did not leave {device} {where} {when}.", "{who} remembered to take {device} along {where} {when}."],
      {"who": [("my neighbor",), ("the journalist",), ("Felix",)],
       "device": [("a phone", "a mobile phone"), ("the laptop",), ("a pair of wireless earbuds", "a set of wireless earbuds")],
       "where": [("on the train",), ("at the cafe", "in the coffee shop"), ("in a taxi", "in a cab")],
       "when": [("last Friday", "on Friday"), ("yesterday afternoon",), ("this morning",)]},
      ["where", "when"], ["device"]),
    F("new_phone", "phones", "tech",
      ["The new phone has {feature} and costs {price}.", "Priced at {price}, the new phone comes with {feature}.",
       "The new phone costs {price} and includes {feature}."],
      ["The new phone does not have {feature}, and it costs {price}.", "Despite costing {price}, the new phone lacks {feature}."],
      {"feature": [("a larger screen", "a bigger display"), ("a better camera", "an improved camera"),
                   ("a longer-lasting battery", "a battery that lasts longer")],
       "price": [("about 500 dollars", "roughly $500"), ("about 550 dollars", "roughly $550"),
                 ("just under 500 dollars", "a little less than $500")]},
      ["price"], ["feature"]),
    # ---- tech / computers
    F("printer", "computers", "tech",
      ["The printer in the {room} is {state} again.", "Once again, the printer in the {room} is {state}.",
       "The {room} printer is {state} again."],
      ["The printer in the {room} is working fine for once.", "For a change, the printer in the {room} is not {state}."],
      {"room": [("library",), ("main office", "front office"), ("copy room", "copier room")],
       "state": [("out of paper", "empty of paper"), ("jammed", "stuck with a paper jam"), ("offline", "not connected")]},
      ["room"], ["state"]),
    F("bug", "computers", "tech",
      ["{who} spent {dur} trying to fix a bug in the {prog}.", "{who} worked for {dur} to fix a bug in the {prog}.",
       "Fixing a bug in the {prog} took {who} {dur}."],
      ["{who} did not manage to fix the bug in the {prog}, even after {dur}.", "After {dur}, the bug in the {prog} was still not fixed by {who}."],
      {"who": [("the developer", "the programmer"), ("my classmate",), ("Ravi",)],
       "prog": [("payment app", "app for payments"), ("website's login page", "login page of the website"),
                ("spreadsheet macro", "macro in the spreadsheet")],
       "dur": [("three hours", "3 hours"), ("the whole afternoon", "all afternoon"), ("two days", "a couple of days")]},
      ["dur"], ["prog"]),
]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def render(frame: Frame, template: str, values: dict[str, int], rng: random.Random) -> str:
    filled = {k: rng.choice(frame.slots[k][i]) for k, i in values.items()}
    return _cap(template.format(**filled))


def sample_values(frame: Frame, rng: random.Random) -> dict[str, int]:
    return {k: rng.randrange(len(v)) for k, v in frame.slots.items()}


def change(frame: Frame, values: dict[str, int], slot: str, rng: random.Random) -> dict[str, int]:
    new = dict(values)
    new[slot] = rng.choice([i for i in range(len(frame.slots[slot])) if i != values[slot]])
    return new


# target share of each score, for ~320 train / ~120 dev pairs
SCORE_PLAN = {5.0: 52, 4.0: 56, 3.4: 20, 3.0: 48, 2.6: 24, 2.4: 28, 2.0: 36, 1.0: 32, 0.0: 24}


def make_pair(score: float, frames: list[Frame], rng: random.Random) -> tuple[str, str] | None:
    if score >= 2.4:
        pool = [f for f in frames if score != 3.4 or len(f.minor) >= 2]
        fr = rng.choice(pool)
        v = sample_values(fr, rng)
        t1 = rng.choice(fr.forms)
        a = render(fr, t1, v, rng)
        if score == 5.0:
            b = render(fr, rng.choice([t for t in fr.forms if t != t1]), v, rng)
        elif score == 4.0:
            b = render(fr, rng.choice(fr.forms), change(fr, v, rng.choice(fr.minor), rng), rng)
        elif score == 3.4:
            s1, s2 = rng.sample(fr.minor, 2)
            b = render(fr, rng.choice(fr.forms), change(fr, change(fr, v, s1, rng), s2, rng), rng)
        elif score == 3.0:
            b = render(fr, rng.choice(fr.forms), change(fr, v, rng.choice(fr.major), rng), rng)
        elif score == 2.6:
            w = change(fr, change(fr, v, rng.choice(fr.major), rng), rng.choice(fr.minor), rng)
            b = render(fr, rng.choice(fr.forms), w, rng)
        else:  # 2.4 negation
            b = render(fr, rng.choice(fr.negs), v, rng)
        return a, b
    f1 = rng.choice(frames)
    if score == 2.0:
        pool = [f for f in frames if f.topic == f1.topic and f is not f1]
    elif score == 1.0:
        pool = [f for f in frames if f.domain == f1.domain and f.topic != f1.topic]
    else:
        pool = [f for f in frames if f.domain != f1.domain]
    if not pool:
        return None
    f2 = rng.choice(pool)
    a = render(f1, rng.choice(f1.forms), sample_values(f1, rng), rng)
    b = render(f2, rng.choice(f2.forms), sample_values(f2, rng), rng)
    return a, b


def build_sts(frames: list[Frame], total: int, rng: random.Random) -> list[dict]:
    scale = total / sum(SCORE_PLAN.values())
    plan = {s: round(n * scale) for s, n in SCORE_PLAN.items()}
    plan[4.0] += total - sum(plan.values())
    seen: set[frozenset[str]] = set()
    out: list[dict] = []
    for score, n in plan.items():
        made, tries = 0, 0
        while made < n and tries < 200 * n:
            tries += 1
            pair = make_pair(score, frames, rng)
            if pair is None:
                continue
            a, b = pair
            key = frozenset((a, b))
            if a == b or key in seen:
                continue
            seen.add(key)
            if rng.random() < 0.5:
                a, b = b, a
            out.append({"sentence1": a, "sentence2": b, "score": score})
            made += 1
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------
# Writing and checks
# ----------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_qrels(path: Path, qrels: list[tuple[str, str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for q, d, s in qrels:
            fh.write(f"{q}\t{d}\t{s}\n")


def main(out_dir: Path = OUT_DIR) -> dict:
    families = parse_knowledge_base()
    ir_train, corpus, queries, qrels = build_ir(families, random.Random(SEED))
    sts_train = build_sts(STS_FRAMES_TRAIN, 320, random.Random(SEED + 1))
    sts_dev = build_sts(STS_FRAMES_DEV, 120, random.Random(SEED + 2))

    write_jsonl(out_dir / "ir_train.jsonl", ir_train)
    write_jsonl(out_dir / "ir_dev" / "corpus.jsonl", corpus)
    write_jsonl(out_dir / "ir_dev" / "queries.jsonl", queries)
    write_qrels(out_dir / "ir_dev" / "qrels" / "dev.tsv", qrels)
    write_jsonl(out_dir / "sts_train.jsonl", sts_train)
    write_jsonl(out_dir / "sts_dev.jsonl", sts_dev)

    summary = {
        "ir_train": len(ir_train), "ir_dev_corpus": len(corpus), "ir_dev_queries": len(queries),
        "sts_train": len(sts_train), "sts_dev": len(sts_dev),
        "sts_train_scores": dict(sorted(Counter(r["score"] for r in sts_train).items(), reverse=True)),
        "sts_dev_scores": dict(sorted(Counter(r["score"] for r in sts_dev).items(), reverse=True)),
    }
    return summary


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
