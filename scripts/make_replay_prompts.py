"""Write lit_llama_lab/tasks/data/replay_prompts.jsonl: the general chat prompts the frozen base answers once for
replay (self-distillation) during fine-tuning. Deterministic: topic lists x rotating phrasings, seeded numbers.

The topics stay away from what the general-ability suite asks (its facts, words to translate, list themes, code
tasks); a prompt that still comes too close to a suite prompt (:func:`too_close`, the test's criteria) is dropped
and named on stdout.

    python scripts/make_replay_prompts.py
"""

from __future__ import annotations

import json
import random
from itertools import cycle

from lit_llama_lab.tasks.general import REPLAY_FILE, load_suite, mentions_emoji
from lit_llama_lab.tasks.overlap import too_close

EXPLAIN = ["Explain {} in simple terms.", "How does {} work?", "Can you explain {} to a beginner?",
           "What is {}, and why does it matter?", "Give me a short explanation of {}.",
           "I've never understood {}. Could you explain it?", "Describe {} in a few sentences.",
           "What should everyone know about {}?"]
CONCEPTS = [
    "inflation", "compound interest", "how vaccines train the immune system", "gravity", "a refrigerator",
    "the water cycle", "how airplanes stay in the air", "the internet", "a blockchain", "machine learning",
    "recycling", "the immune system", "ocean tides", "volcanic eruptions", "earthquakes", "a rechargeable battery",
    "static electricity", "magnetism", "DNA", "natural selection", "the greenhouse effect", "a credit score",
    "supply and demand", "a mortgage", "the stock market", "an index fund", "a budget", "opportunity cost",
    "the placebo effect", "sleep cycles", "muscle memory", "a microwave oven", "noise-cancelling headphones",
    "GPS navigation", "Wi-Fi", "cloud computing", "encryption", "a password manager", "two-factor authentication",
    "an operating system", "a computer's memory", "a search engine", "a hash function", "a compiler",
    "public-key cryptography", "the scientific method", "a hypothesis", "statistical significance", "an average",
    "probability", "a black hole", "an eclipse", "the speed of light", "sound waves", "echoes",
    "the northern lights", "a thermostat", "a heat pump", "solar panels", "wind turbines", "nuclear power",
    "a hybrid car", "a jet engine", "a bicycle's gears", "a lever", "friction", "buoyancy", "the Doppler effect",
    "the food chain", "plate tectonics", "antibiotics", "blood types", "metabolism", "caffeine's effect on the body",
    "jet lag", "the five-second rule", "procrastination", "the Pomodoro technique", "cognitive dissonance",
    "confirmation bias", "impostor syndrome", "democracy", "a constitution", "the separation of powers",
    "taxes", "a trade deficit", "globalization", "the printing press's impact", "the Industrial Revolution",
    "the Cold War", "the Silk Road", "feudalism", "the Olympic Games' origins",
]
HOWTO = ["How do I {}?", "What's the best way to {}?", "Can you give me step-by-step instructions to {}?",
         "I want to {}. Where do I start?", "Any tips on how to {}?", "What do I need to {}?"]
TASKS = [
    "boil an egg so the yolk stays soft", "make a cup of tea", "bake banana bread", "cook rice on the stove",
    "sharpen a kitchen knife", "clean a cast iron pan", "remove a coffee stain from a shirt", "iron a dress shirt",
    "tie a tie", "fold a fitted sheet", "change a flat tire", "jump-start a car", "check my tire pressure",
    "unclog a sink", "fix a squeaky door", "hang a picture frame straight", "paint a room", "repot a houseplant",
    "start a vegetable garden on a balcony", "keep basil alive indoors", "compost kitchen scraps",
    "set up a home Wi-Fi network", "back up my phone", "free up space on my laptop", "take a screenshot on Windows",
    "write a good cover letter", "prepare for a job interview", "ask for a raise", "negotiate a lower rent",
    "make a monthly budget", "start an emergency fund", "pay off credit card debt", "start running as a beginner",
    "stretch after a workout", "improve my posture at my desk", "fall asleep faster", "wake up earlier",
    "drink more water during the day", "meal prep for a week", "learn to touch type", "memorize a speech",
    "take better notes in class", "study for an exam in a week", "read more books", "learn a new language on my own",
    "start a journal", "meditate for the first time", "give a good presentation", "write a clear email",
    "organize my closet", "declutter my apartment", "plan a birthday party", "pack light for a trip",
    "plan a road trip", "get over jet lag quickly", "take good photos with my phone", "learn to juggle",
    "start learning the guitar", "improve my handwriting", "make friends in a new city", "apologize to a friend",
    "say no politely", "deal with a noisy neighbor", "keep a conversation going", "write a thank-you note",
    "train a puppy to sit", "introduce a new cat to my home", "clean my keyboard", "speed up a slow computer",
    "create a strong password", "spot a phishing email", "set up a Python virtual environment",
    "install a package with pip", "undo my last git commit", "resolve a merge conflict in git",
    "write a good README", "debug a program that crashes", "learn to code as an adult",
    "make a simple website", "center a div in CSS", "make cold brew coffee", "make pancakes from scratch",
    "cook pasta al dente", "make a simple salad dressing", "store fresh herbs", "freeze bread",
    "write a haiku", "learn to swim as an adult", "improve my chess game", "make homemade pizza dough",
    "descale a kettle", "get rid of fruit flies", "keep my phone battery healthy", "choose running shoes",
    "write a short speech for a retirement party", "start a book club", "teach a child to tie shoelaces",
    "clean a microwave quickly", "remove rust from tools", "plant tulip bulbs", "sew a button back on",
]
ADVICE = [
    "I have a big exam tomorrow and I'm really nervous. Any advice?",
    "My roommate never does the dishes. How should I bring it up?",
    "I keep procrastinating on my thesis. What can I do?",
    "I just moved to a new city and feel lonely. What should I do?",
    "How can I stay motivated when working from home?",
    "I'm starting my first job next week. Any tips?",
    "My friend forgot my birthday and I feel hurt. Should I say something?",
    "How do I handle a coworker who keeps interrupting me?",
    "I want to get fit but I only have twenty minutes a day. What would you suggest?",
    "What should I consider before adopting a dog?",
    "I can't decide between two job offers. How should I think about it?",
    "How can I be more productive in the mornings?",
    "What are good habits for managing stress?",
    "I spend too much time on my phone. How can I cut back?",
    "How do I keep a long-distance friendship strong?",
    "I'm nervous about public speaking. How can I get better at it?",
    "What should I do if I feel burned out at work?",
    "How can I save money on a tight budget?",
    "My teenager won't talk to me much anymore. Any advice?",
    "I want to change careers at 35. Is it too late, and where do I begin?",
    "How do I give constructive feedback without hurting someone's feelings?",
    "What's a good way to handle rejection?",
    "How can I make my small apartment feel bigger?",
    "I get distracted easily when studying. What helps?",
    "How do I tell my boss I'm overloaded with work?",
    "What's a healthy way to deal with anger?",
    "I have trouble remembering people's names. Any tricks?",
    "How do I prepare for my first marathon?",
    "How can I become a better listener?",
    "What should I pack for a week-long hiking trip?",
    "How do I choose a good laptop for university?",
    "My plants keep dying. What am I doing wrong?",
    "How can I make new habits stick?",
    "I always run late. How can I become more punctual?",
    "What should I think about before buying my first car?",
    "How can I support a friend who is going through a hard time?",
    "I'm bored on weekends. What could I do?",
    "What are some ways to unwind after a long day?",
    "How do I politely leave a conversation at a party?",
    "I feel stuck in my hobbies. How can I find something new?",
    "What's the best way to prepare for a long flight?",
    "How do I stop overthinking everything?",
    "I want to learn to cook but I'm a complete beginner. What dishes should I try first?",
    "How can I reduce food waste at home?",
    "How do I keep my kids entertained on a rainy day?",
    "I'm hosting dinner for six people. How do I plan the menu?",
    "How can I write more clearly at work?",
    "What should I do the night before a job interview?",
    "How can I spend less on coffee without giving it up?",
    "I'd like to volunteer. How do I find something that suits me?",
]
WRITE = ["Write a short {} about {}.", "Could you write a {} about {}?", "Draft a {} about {}.",
         "Please write a brief {} on {}."]
FORMS = ["poem", "haiku", "story", "limerick", "descriptive paragraph", "bedtime story", "four-line poem",
         "diary entry", "song verse", "scene for a play", "fable", "free-verse poem"]
SUBJECTS = [
    "a rainy afternoon", "a lost umbrella", "the first day at a new school", "a lighthouse keeper",
    "a cup of coffee", "learning to ride a bike", "a city at night", "an old library", "a robot learning to paint",
    "a garden in spring", "moving house", "a long train journey", "a friendly dragon", "a broken clock",
    "the last day of summer", "a lighthouse in a storm", "a reusable water bottle", "a handmade wooden chair",
    "a smart alarm clock", "a walk in the forest", "a grandmother's recipe", "the sound of the sea",
    "a snowy morning", "a marathon finish line", "friendship", "patience", "a quiet village", "a new puppy",
    "a mountain sunrise", "a busy market", "a paper airplane", "a late-night study session", "a lost key",
    "a street musician", "a surprise party", "a bakery at dawn", "teamwork", "a shooting star",
    "a bicycle repair shop", "an unexpected letter", "a rainy football match", "a cozy reading nook",
    "a hot air balloon ride", "kindness to strangers", "an abandoned amusement park", "a first snowfall",
    "homemade soup", "a noisy neighbor's parrot",
]
MESSAGES = [
    "Write a polite email to my landlord asking when the heating will be fixed.",
    "Write a short thank-you message to a colleague who helped me with a project.",
    "Draft a text to a friend cancelling dinner plans and suggesting another date.",
    "Write a two-sentence bio for a freelance graphic designer.",
    "Write a friendly reminder email about an unpaid invoice.",
    "Write a short welcome message for new members of a book club.",
    "Write an out-of-office reply for a week-long vacation.",
    "Write a birthday message for my grandfather who is turning 90.",
    "Write a short apology for replying late to an email.",
    "Write a catchy slogan for a neighborhood bakery.",
    "Write a one-paragraph summary of why exercise is good for mental health.",
    "Write a short LinkedIn post announcing that I started a new job.",
    "Write a note to my neighbor asking them to water my plants while I'm away.",
    "Write three interview questions for a customer service role.",
    "Write a short toast for my best friend's wedding.",
    "Write a complaint email about a delayed package, polite but firm.",
    "Write a short description of a cozy cabin for a rental listing.",
    "Write an invitation to a small housewarming party on Saturday evening.",
    "Write a two-line rhyme to put on a birthday cake card.",
    "Write a motivational note for a student before final exams.",
]
DEFINE = ["What does the word \"{}\" mean?", "Define \"{}\".", "Can you use \"{}\" in a sentence?",
          "What is the meaning of \"{}\", with an example?"]
WORDS = [
    "ephemeral", "ubiquitous", "resilient", "meticulous", "ambiguous", "pragmatic", "candid", "benevolent",
    "eloquent", "frugal", "gregarious", "hypothesis", "inevitable", "juxtapose", "lethargic", "mundane",
    "nostalgia", "obsolete", "paradox", "quintessential", "redundant", "serendipity", "tenacious", "unanimous",
    "verbose", "whimsical", "zealous", "altruism", "bureaucracy", "catalyst", "dilemma", "empathy", "fallacy",
    "hindsight", "irony", "jargon", "kudos", "leverage", "metaphor", "nuance", "oxymoron", "plagiarism",
    "rhetoric", "sarcasm", "tangible", "utopia", "vague", "wanderlust", "euphemism", "cliche", "idiom",
    "analogy", "hyperbole", "anecdote", "consensus", "deadline", "etiquette", "feasible", "gratitude", "mentor",
    "ambivalent", "cacophony", "diligent", "epiphany", "facetious", "hubris", "innate", "laconic", "mitigate",
    "nonchalant", "ominous", "prudent", "reluctant", "scrutinize", "trivial", "vindicate", "wistful", "alleviate",
    "bolster", "coherent",
]
COMPARE = ["What's the difference between {} and {}?", "How is {} different from {}?", "Compare {} and {}.",
           "Can you explain how {} and {} differ?"]
PAIRS = [
    ("a virus", "a bacterium"), ("weather", "climate"), ("a crocodile", "an alligator"), ("empathy", "sympathy"),
    ("affect", "effect"), ("a latte", "a cappuccino"), ("renting", "buying a home"), ("a Roth IRA", "a traditional IRA"),
    ("a debit card", "a credit card"), ("baking soda", "baking powder"), ("a hurricane", "a tornado"),
    ("a simile", "a metaphor"), ("RAM", "storage"), ("HTTP", "HTTPS"), ("a laptop", "a desktop"),
    ("a list", "a tuple in Python"), ("SQL", "NoSQL databases"), ("TCP", "UDP"), ("a stock", "a bond"),
    ("a frog", "a toad"), ("stress", "anxiety"), ("jam", "jelly"), ("a county", "a state"),
    ("speed", "velocity"), ("mass", "weight"), ("a lake", "a pond"), ("a college", "a university"),
    ("who", "whom"), ("fewer", "less"), ("an e-book reader", "a tablet"), ("a sprint", "a marathon training plan"),
    ("yoga", "pilates"), ("a will", "a trust"), ("an LED bulb", "an incandescent bulb"), ("Linux", "Windows"),
    ("git merge", "git rebase"), ("an interpreter", "a compiler"), ("a tablespoon", "a teaspoon"),
    ("a mushroom", "a toadstool"), ("a mentor", "a coach"), ("Celsius", "Kelvin"), ("an app", "a website"),
]
LISTS = [
    "List five tips for writing a good essay.", "Give me some ideas for a rainy day indoors.",
    "What are some easy healthy breakfast ideas?", "Suggest a few names for a pet goldfish.",
    "What are some ways to save money on groceries?", "List some good habits for better sleep.",
    "Give me ten verbs that start with the letter r.", "What are some fun things to do in winter with kids?",
    "Suggest five questions to ask at the end of a job interview.", "What are some classic board games for a family?",
    "List a few things to check before a long drive.", "Give me some conversation starters for a networking event.",
    "What are some good stretches for lower back pain?", "List five ways to reduce plastic use at home.",
    "Name a few famous novels worth reading.", "What should go in a basic first-aid kit?",
    "Suggest some cheap date ideas.", "List some signs that a houseplant needs more light.",
    "What are some quick dinner ideas with eggs?", "Give me a packing list for a beach weekend.",
    "What are some good questions to ask a new friend?", "List some productive things to do on a commute.",
    "Suggest some hobbies that don't cost much.", "What are some tips for a first-time camper?",
    "List five common mistakes new drivers make.", "Give me some ideas for a science fair project.",
    "What are some ways to be kinder to the environment?", "List a few tips for keeping a tidy desk.",
    "What are some polite ways to say no?", "Suggest some themes for a costume party.",
    "Give me five writing prompts for a short story.", "What are some good snacks for a long hike?",
    "List some useful keyboard shortcuts on a Mac.", "What are some ways to practice gratitude?",
    "Suggest a few topics for a beginner's podcast.", "List some things to do before moving out of an apartment.",
    "What are some common interview questions?", "Give me some ideas for a team-building activity.",
    "What are some good habits for learning math?", "List some ways to make a long meeting shorter.",
]
REWRITE = ["Make this sentence sound friendlier: \"{}\"", "Rewrite this more concisely: \"{}\"",
           "Paraphrase this sentence: \"{}\"", "Make this sound more professional: \"{}\"",
           "Fix any grammar mistakes in this sentence: \"{}\"", "Rewrite this for a ten-year-old: \"{}\""]
SENTENCES = [
    "Send me the report by five or else.", "Due to the fact that it was raining, the game was postponed.",
    "The meeting has been moved to a later time that has not yet been decided.", "Me and him goes to the gym on Tuesdays.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Your order is late because our warehouse had problems.", "I need this done now.",
    "At this point in time we are not in a position to offer a refund.",
    "Their going to the concert tomorrow night.", "Mitochondria produce most of the cell's supply of energy.",
    "We regret to inform you that your application was unsuccessful.", "Whoever finishes last cleans up.",
    "The software update will be installed automatically overnight.", "Don't forget to bring you're laptop.",
    "In order to improve performance, we made a number of changes to the system.",
    "The committee reached a decision after a long and detailed discussion.",
    "The team was really really happy about the really good results.", "Please be advised that the office is closed.",
    "The budget got cut so the project is delayed.", "Each of the students have their own locker.",
    "The quarterly figures exceeded expectations across all regions.", "I could care less about the weather.",
    "The river overflowed its banks after three days of heavy rain.", "You must register before the deadline.",
    "Less people came to the event than we expected.", "The new policy takes effect at the start of next month.",
    "We apologize for any inconvenience this may cause.", "Irregardless of the cost, we should fix the roof.",
    "The library will be closed for renovations until spring.", "This product is the best thing ever made.",
]
TRANSLATE = ["Translate \"{}\" into {}.", "How would you say \"{}\" in {}?", "What is \"{}\" in {}?"]
PHRASES = [
    ("Where is the train station?", "French"), ("I would like a coffee, please.", "Spanish"),
    ("The weather is nice today.", "German"), ("Can you help me?", "French"), ("How much does this cost?", "Spanish"),
    ("My name is Anna.", "German"), ("I don't understand.", "French"), ("See you tomorrow.", "Spanish"),
    ("Where is the bathroom?", "German"), ("I am learning Italian.", "Italian"), ("window", "French"),
    ("bread", "Spanish"), ("tree", "German"), ("moon", "Italian"), ("The bus is late.", "French"),
    ("Happy birthday!", "Spanish"), ("I live in a small town.", "German"), ("What time is it?", "French"),
    ("The soup is hot.", "Spanish"), ("We are going to the beach.", "Italian"), ("chair", "German"),
    ("library", "Spanish"), ("sun hat", "French"), ("Excuse me, where is the museum?", "Italian"),
    ("I have a brother and a sister.", "German"), ("The children are playing in the park.", "French"),
    ("Do you speak English?", "Spanish"), ("Nice to meet you.", "German"), ("left and right", "Italian"),
    ("It is raining.", "French"), ("kitchen", "Spanish"), ("Welcome!", "German"),
]
TRANSLATE_BACK = [
    "What does \"Wie spät ist es?\" mean in English?", "What does the French phrase \"je ne sais quoi\" mean?",
    "What does \"hasta luego\" mean?", "Translate \"Ich bin müde\" into English.",
    "What does \"déjà vu\" mean, and where does it come from?", "Translate \"la biblioteca está cerrada\" into English.",
    "What does \"Gesundheit\" mean?", "What does \"mañana\" mean in English?",
    "Translate \"Où est la gare ?\" into English.", "What does the Italian word \"ciao\" mean?",
    "What does \"Schadenfreude\" mean?", "Translate \"¿Dónde está el mercado?\" into English.",
    "What is the meaning of \"bon appétit\"?", "Translate \"Es ist kalt draußen\" into English.",
    "What does \"c'est la vie\" mean?", "What does \"Kindergarten\" literally mean in German?",
]
CODE = [
    "Write a Python function that checks whether a string is a palindrome.",
    "How do I read a CSV file with pandas?", "Explain what a Python decorator is, with a small example.",
    "What's the difference between a list and a dictionary in Python?", "How do I reverse an array in JavaScript?",
    "Write a Python function that returns the factorial of a number.", "How do I check if a key exists in a Python dict?",
    "Write a SQL query that counts the rows in a table called orders.", "What does the 'git status' command show?",
    "How do I remove duplicates from a list in Python while keeping the order?",
    "Write a Python function that checks whether a number is prime.", "What is recursion? Show a short example.",
    "How do I open and read a text file line by line in Python?", "What is a REST API?",
    "Explain the difference between == and is in Python.", "How do I sort a list of dictionaries by a key in Python?",
    "Write a bash command that counts the lines in a file.", "What does 'async' mean in JavaScript?",
    "How can I measure how long a piece of Python code takes to run?", "What is a Python generator?",
    "Write a function in JavaScript that adds two numbers.", "How do I format a float with two decimals in Python?",
    "What is the difference between a class and an object?", "How do I handle exceptions in Python?",
    "Write a regular expression that matches a five-digit US zip code.", "What does JSON stand for, and what is it used for?",
    "How do I merge two dictionaries in Python?", "Explain what Big O notation means.",
    "What is the difference between git pull and git fetch?", "How do I create a virtual environment in Python?",
    "Write a Python function that counts the words in a sentence.", "What is an API key, and how should I store it?",
    "How do I find the maximum value in a Python dictionary's values?", "What does the 'self' parameter do in Python?",
    "Write a short Python script that prints the current date.", "What is a null pointer exception?",
    "How do I convert a list of strings to one comma-separated string in Python?", "What is unit testing?",
    "Explain what a for loop does, with an example in Python.", "How do I get user input in Python?",
    "What is the difference between let and const in JavaScript?", "How do I write a docstring for a Python function?",
    "Write a Python function that returns the largest of three numbers.", "What is a hash map?",
    "How do I iterate over both index and value of a list in Python?", "What is the purpose of a .gitignore file?",
    "Explain the difference between a stack and a queue.", "How do I make an HTTP request in Python?",
    "Write a Python function that converts Celsius to Fahrenheit.", "What is a lambda function in Python?",
    "How do I write to a file in Python?", "What does 'pip freeze' do?", "What is a SQL JOIN?",
    "Write a SQL query to find the ten most recent rows in a table called events.",
    "How do I capitalize the first letter of a string in JavaScript?", "What is the difference between a tuple and a set?",
    "How do I flatten a list of lists in Python?", "What is type hinting in Python?",
    "Explain what a Docker container is.", "How do I schedule a task to run every day on Linux?",
    "Write a Python one-liner to sum the numbers in a list called values.",
    "How do I check which version of Python I have installed?", "What does the 'return' statement do?",
    "How do I count how often each item appears in a Python list?", "What is a race condition?",
    "Write a function that returns the nth Fibonacci number in Python.", "What are environment variables?",
    "How do I pretty-print JSON in Python?", "What is an off-by-one error?",
    "How do I split a string into a list of characters in Python?", "Explain what a linked list is.",
    "What is the difference between a process and a thread?", "How do I rename a file with Python?",
    "Write a Python function that returns the vowels in a word.", "What does 'None' mean in Python?",
    "What is an infinite loop, and how do I avoid one?", "How do I delete a branch in git?",
    "Write a CSS rule that makes all paragraphs blue.", "What is the difference between HTML and CSS?",
    "How do I round a number to the nearest ten in Python?", "What is a virtual machine?",
    "Write a Python function that removes spaces from a string.", "What is an index in a database?",
    "How do I use f-strings in Python?", "What does 'break' do inside a loop?",
    "Write a Python function that returns True if a list is empty.",
]
OPEN = [
    "Tell me a joke about computers.", "What can you help me with?", "Tell me an interesting fact about octopuses.",
    "Why is the sky blue?", "Why do cats purr?", "Why do we dream?", "Why do onions make you cry?",
    "How do birds know where to migrate?", "Why does bread go stale?", "Why do leaves change color in the fall?", "Why is the ocean salty?", "How do noise-cancelling headphones work?",
    "What makes a good leader?", "Is it better to study in the morning or at night?",
    "Is it safe to eat raw cookie dough?", "Is coffee bad for your health?", "Can dogs eat chocolate?",
    "Is it okay to drink water right after a meal?", "Should I stretch before or after running?",
    "How long should I nap during the day?", "How much sleep does a teenager need?",
    "How many cups of coffee a day is too many?", "What causes hiccups?", "Why do we yawn?",
    "What's a good way to start learning about astronomy?", "What is the meaning of life, in your view?",
    "Recommend a good habit to start this month.", "What's an easy way to remember the order of operations in math?",
    "Who invented the telephone?", "Who discovered penicillin?", "Who developed the theory of relativity?",
    "When was the printing press invented?", "What is the capital of Australia, and why isn't it Sydney?",
    "Which is the smallest country in the world?", "What is the longest river in Europe?",
    "How far away is the Moon from the Earth?", "How old is the universe, roughly?",
    "What is the population of Canada, approximately?", "What language is spoken in Argentina?",
    "How many bones does an adult human have?", "How many players are on a soccer team?",
    "What is the speed of sound in air?", "What is the chemical formula for table salt?",
    "Which element has the symbol Fe?", "What year did the Berlin Wall fall?", "Who was Cleopatra?",
    "Who was Marie Curie, and what did she discover?", "What was the Great Wall of China built for?",
    "Why did the Titanic sink?", "What is the tallest building in the world?",
    "How many time zones does Russia have?", "What is the largest desert in the world?",
    "Which country has the most islands?", "What is the deepest point in the ocean?",
    "Why do we have leap years?", "How do fireflies glow?", "Why do some people snore?",
    "What's the origin of the word 'robot'?", "Why do planes leave white trails in the sky?",
    "How do chameleons change color?", "Why does ice float on water?", "Why do our ears pop on a plane?",
    "How does a lightning rod protect a building?", "What causes thunder?", "Why do cats land on their feet?",
    "How do submarines dive and surface?", "Why are flamingos pink?", "What is a good age to learn to swim?",
    "How do I know if an egg is still fresh?", "Is it bad to crack your knuckles?",
    "How long does it take to form a habit?", "Why do we get goosebumps?", "How does a compass work?",
    "What is the difference between a calorie and a kilocalorie?", "Why do we celebrate New Year's Eve at midnight?",
    "Who built the first successful airplane?", "Who wrote Pride and Prejudice?", "Who composed The Magic Flute?",
    "What is the smallest bone in the human body?", "How long is a marathon?", "What does a geologist study?",
    "Why did the dinosaurs go extinct?", "What is the Great Barrier Reef?", "How do tsunamis form?",
    "Summarize the plot of Cinderella in three sentences.", "Tell me a fun riddle and its answer.",
    "What would happen if the Earth stopped spinning?", "Give me a fun fact about the human brain.",
]
ARITHMETIC = [
    "Can you work out {a} minus {b} for me?", "I have {a} marbles and give away {b}. How many are left?",
    "Add {a} and {b}, please.", "What do you get if you multiply {c} by {d}?",
    "If I split {e} cookies equally among {d} friends, how many does each get?",
    "A shirt costs ${a}. It's on sale for {p} percent off. What's the sale price?",
    "I drive {c} kilometers a day for {d} days. How far is that in total?",
    "What's the average of {c}, {d} and {f}?", "How many seconds are in {d} minutes?",
    "Calculate a {p}% tip on a restaurant bill of ${a}.",
]


def _rotate(templates: list[str], topics: list, start: int = 0) -> list[str]:
    """Each topic in one phrasing, the phrasings taken in turn (offset by ``start``)."""
    phrasings = cycle(templates[start:] + templates[:start])
    return [next(phrasings).format(*(topic if isinstance(topic, tuple) else (topic,))) for topic in topics]


def _arithmetic(rng: random.Random, count: int) -> list[str]:
    prompts = []
    for index in range(count):
        d = rng.randint(3, 9)
        numbers = {"a": rng.randint(120, 980), "b": rng.randint(15, 110), "c": rng.randint(13, 48), "d": d,
                   "e": d * rng.randint(4, 12), "f": rng.randint(10, 60), "p": rng.choice([10, 15, 20, 30, 40])}
        prompts.append(ARITHMETIC[index % len(ARITHMETIC)].format(**numbers))
    return prompts


def candidates() -> list[str]:
    """Every replay prompt before the overlap filter, in a fixed order."""
    rng = random.Random(16)
    subjects = rng.sample(SUBJECTS, len(SUBJECTS))
    writing = [WRITE[i % len(WRITE)].format(FORMS[i % len(FORMS)], subject) for i, subject in enumerate(subjects)]
    return (
        _rotate(EXPLAIN, CONCEPTS) + _rotate(EXPLAIN, CONCEPTS[::3], start=3) + _rotate(HOWTO, TASKS)
        + _rotate(HOWTO, TASKS[1::4], start=2) + ADVICE + writing + MESSAGES + _rotate(DEFINE, WORDS)
        + _rotate(COMPARE, PAIRS) + LISTS + _rotate(REWRITE, SENTENCES) + _rotate(REWRITE, SENTENCES[::2], start=3)
        + _rotate(TRANSLATE, PHRASES) + TRANSLATE_BACK + CODE + OPEN + _arithmetic(rng, 60)
    )


def main() -> None:
    suite = [row["prompt"] for row in load_suite()]
    kept, seen = [], set()
    for prompt in candidates():
        prompt = prompt[0].upper() + prompt[1:]
        close = too_close(prompt, suite)
        if close or prompt in seen or mentions_emoji(prompt):
            print(f"dropped {prompt!r}" + (f" (close to suite prompt {close!r})" if close else ""))
            continue
        seen.add(prompt)
        kept.append(prompt)
    REPLAY_FILE.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in kept), encoding="utf-8")
    print(f"{len(kept)} replay prompts -> {REPLAY_FILE}")


if __name__ == "__main__":
    main()
